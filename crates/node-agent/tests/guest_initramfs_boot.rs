//! The platform initramfs boots: `build-initramfs` (the library function behind it) with
//! the modules of Debian's `linux-image-cloud-amd64` and the static guest init produces
//! an image that `qemu-system-x86_64 -M microvm,accel=tcg` boots to guest init's first
//! console line; guest init then loads the modules, fails the handshake (the VM has no
//! vsock device) with a clear console line within its 5 s deadline, and reboots, which
//! ends QEMU (`-no-reboot`).
//!
//! A second test runs a whole VM: the root disk, scratch disk and a volume as
//! virtio-blk devices, vsock through `vhost-device-vsock` (the hybrid Unix-socket
//! convention of DESIGN §5), and the agent's `guest` module as the host side: handshake,
//! overlay root, secrets, volume, the workload's exit code, and the VM ending itself.
//!
//! Prerequisites: qemu-system-x86_64, a `/boot/vmlinuz-*-cloud-amd64` kernel with its
//! `/lib/modules/<version>` (or `PLFM_TEST_KERNEL` + `PLFM_TEST_KERNEL_MODULES`), and the
//! static guest init (`PLFM_GUEST_INIT_BIN`, else built with scripts/build-guest-init.sh);
//! for the second test also `vhost-device-vsock` (crates.io; `PLFM_VHOST_DEVICE_VSOCK` or
//! PATH), `mkfs.ext4`, `debugfs` and a static `/bin/busybox`.
//! Missing prerequisites skip the test with a message, or fail it when
//! `PLFM_REQUIRE_SYSTEM_TESTS=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use plfm_guest_protocol::{
    Config, Ipv4Config, MountConfig, NetworkConfig, SecretsConfig, SecretsData, WorkloadConfig,
};
use plfm_node_agent::guest::{
    accept_guest, bind_guest_listener, GuestError, GuestEvent, GuestSession,
};
use plfm_node_agent::initramfs::{write_initramfs, BuildInitramfsArgs};

mod common;
#[path = "support/vm_host.rs"]
mod vm_host;
use common::gate::skip_or_fail as require;
use common::wait::{poll_until, wait_until, Poll};
use vm_host::{find_kernel, static_guest_init};

/// Kills and reaps QEMU when the test ends, pass or fail.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the console shows `needle` (before `deadline`); returns when it was seen.
/// Fails at once if QEMU exits first.
fn wait_for_line(log: &Path, needle: &str, deadline: Instant, qemu: &mut Child) -> Instant {
    let console = || std::fs::read_to_string(log).unwrap_or_default();
    poll_until(
        &format!("{needle:?} on the console"),
        deadline.saturating_duration_since(Instant::now()),
        || {
            let exited = qemu.try_wait().ok().flatten();
            let text = console();
            if text.contains(needle) {
                return Ok(Instant::now());
            }
            if let Some(status) = exited {
                panic!("qemu exited ({status}) before {needle:?}; console:\n{text}");
            }
            Err(format!("console:\n{text}"))
        },
    )
}

#[test]
fn initramfs_boots_to_guest_init_under_qemu_microvm_tcg() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return require("qemu-system-x86_64 (Debian package qemu-system-x86)");
    }
    let Some((kernel, modules)) = find_kernel() else {
        return require("a /boot/vmlinuz-*-cloud-amd64 kernel with modules (Debian package linux-image-cloud-amd64)");
    };
    let Some(guest_init) = static_guest_init() else {
        return require("static plfm-guest-init (scripts/build-guest-init.sh failed)");
    };
    let dir = tempfile::tempdir().unwrap();
    let args = BuildInitramfsArgs {
        kernel_modules: Some(modules.clone()),
        guest_init: guest_init.clone(),
        out: dir.path().join("initramfs.img"),
    };
    let summary = write_initramfs(&args).unwrap();
    // Same inputs, same bytes.
    let again = BuildInitramfsArgs {
        out: dir.path().join("again.img"),
        ..args.clone()
    };
    write_initramfs(&again).unwrap();
    assert_eq!(
        std::fs::read(&args.out).unwrap(),
        std::fs::read(&again.out).unwrap()
    );
    eprintln!(
        "initramfs: {} bytes, {} module files from {}, built in: {:?}",
        summary.size,
        summary.modules.len(),
        modules.display(),
        summary.builtin
    );

    // Keep a copy for debugging (target/tmp/guest-initramfs.img).
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-initramfs.img");
    let _ = std::fs::copy(&args.out, &keep);
    let log = dir.path().join("console.log");
    // reboot=t (triple fault): QEMU's microvm has no i8042, so Firecracker's reboot=k
    // may end in a BIOS warm restart that QEMU does not see as a reset (the VM boots
    // again instead of exiting under -no-reboot).
    let started = Instant::now();
    let mut qemu = KillOnDrop(
        Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,accel=tcg", "-m", "256", "-smp", "1"])
            // Without KVM the guest kernel calibrates its TSC against the PIT; on a
            // loaded host the TCG vCPU is descheduled during calibration, calibration
            // fails ("tsc: Marking TSC unstable due to could not calculate TSC khz") and
            // the boot stalls. Instruction counting makes the guest's clocks follow
            // its own progress, so calibration succeeds regardless of host load.
            .args(["-icount", "shift=auto"])
            .args(["-no-reboot", "-nodefaults", "-no-user-config", "-nographic"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&args.out)
            .args([
                "-append",
                "console=ttyS0 panic=1 reboot=t platform.instance_id=qemu-boot-test",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu"),
    );
    let deadline = started + Duration::from_secs(60);
    let first = wait_for_line(
        &log,
        "plfm-guest-init: plfm-guest-init",
        deadline,
        &mut qemu.0,
    );
    eprintln!(
        "guest init's first console line after {:.2} s (TCG)",
        (first - started).as_secs_f64()
    );
    if !summary.modules.is_empty() {
        wait_for_line(
            &log,
            "kernel modules from /lib/modules/plfm",
            deadline,
            &mut qemu.0,
        );
    }
    // No vsock device in this VM: the handshake fails clearly and the VM ends itself.
    let failed = wait_for_line(
        &log,
        "FAILED (firecracker_start_failed): handshake failed",
        deadline,
        &mut qemu.0,
    );
    let status = poll_until(
        "qemu to exit after guest init rebooted",
        Duration::from_secs(30),
        || qemu.0.try_wait().unwrap().ok_or("still running"),
    );
    let console = std::fs::read_to_string(&log).unwrap();
    eprintln!("--- console (guest init lines) ---");
    for l in console.lines().filter(|l| l.contains("plfm-guest-init")) {
        eprintln!("{l}");
    }
    assert!(console.contains("rebooting to end the VM"), "{console}");
    assert_eq!(
        console.matches("starting (pid 1)").count(),
        1,
        "the VM booted twice:\n{console}"
    );
    assert!(failed - first < Duration::from_secs(20));
    eprintln!(
        "qemu exited with {status} after {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

fn tool_runs(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn mkfs(img: &Path, size_mb: u64, content: Option<&Path>) {
    std::fs::File::create(img)
        .unwrap()
        .set_len(size_mb << 20)
        .unwrap();
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-E", "root_owner=0:0"]);
    if let Some(dir) = content {
        cmd.arg("-d").arg(dir);
    }
    let out = cmd.arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads a file from an ext4 image without mounting it.
fn debugfs_cat(img: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(img)
        .output()
        .ok()?;
    if String::from_utf8_lossy(&out.stderr).contains("File not found") {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for_path(path: &Path, within: Duration) {
    wait_until(&format!("{} to appear", path.display()), within, || {
        path.exists()
    });
}

/// One VM run: disks, host side, console.
struct VmRun {
    /// Keeps the files alive.
    _dir: tempfile::TempDir,
    root: PathBuf,
    root_before: Vec<u8>,
    scratch: PathBuf,
    volume: PathBuf,
    events: Vec<GuestEvent>,
    console: String,
    lifetime: Duration,
}

/// Boots a VM with a busybox root disk, an empty scratch disk and one empty volume, serves
/// the handshake with `config` through the agent's `guest` module, collects the events up
/// to `exited`/`failed`, and waits for QEMU to exit. `None` when a prerequisite is
/// missing (after `require`).
fn run_vm(config: Config, memory_mb: u32, netns: Option<&str>) -> Option<VmRun> {
    let upper_layers = config.root_layers.saturating_sub(1) as usize;
    run_vm_with(memory_mb, netns, upper_layers, move |listener, rt| {
        rt.block_on(async {
            let s = accept_guest(listener, "vm-e2e", config, Duration::from_secs(90)).await?;
            collect_events(s).await
        })
    })
}

/// Events until `exited`/`failed`, each within 60 s.
async fn collect_events(mut s: GuestSession) -> Result<Vec<GuestEvent>, GuestError> {
    let mut events = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), s.next_event())
            .await
            .map_err(|_| GuestError::Closed {
                when: "test timeout",
            })??;
        let last = matches!(ev, GuestEvent::Exited { .. } | GuestEvent::Failed { .. });
        events.push(ev);
        if last {
            return Ok(events);
        }
    }
}

/// Like [`run_vm`], with the host side of the guest channel played by `host`, and
/// `upper_layers` root layer disks above the root disk (attached after the volume, as
/// the runtimes do): layer 1 whites out `/etc/marker`, makes `/d` opaque holding `y`
/// (the root disk's `/d` holds `x`); layer i holds `/layer-<i>`.
fn run_vm_with(
    memory_mb: u32,
    netns: Option<&str>,
    upper_layers: usize,
    host: impl FnOnce(
        &tokio::net::UnixListener,
        &tokio::runtime::Runtime,
    ) -> Result<Vec<GuestEvent>, GuestError>,
) -> Option<VmRun> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        require("qemu-system-x86_64 (Debian package qemu-system-x86)");
        return None;
    }
    let vhost =
        std::env::var("PLFM_VHOST_DEVICE_VSOCK").unwrap_or_else(|_| "vhost-device-vsock".into());
    if !tool_runs(&vhost, "--version") {
        require(
            "vhost-device-vsock (cargo install vhost-device-vsock, or PLFM_VHOST_DEVICE_VSOCK)",
        );
        return None;
    }
    if !tool_runs("mkfs.ext4", "-V") || !tool_runs("debugfs", "-V") {
        require("mkfs.ext4 and debugfs (Debian package e2fsprogs)");
        return None;
    }
    if !Path::new("/bin/busybox").exists() {
        require("/bin/busybox (Debian package busybox-static)");
        return None;
    }
    let Some((kernel, modules)) = find_kernel() else {
        require("a /boot/vmlinuz-*-cloud-amd64 kernel with modules (Debian package linux-image-cloud-amd64)");
        return None;
    };
    let Some(guest_init) = static_guest_init() else {
        require("static plfm-guest-init (scripts/build-guest-init.sh failed)");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let initramfs = dir.path().join("initramfs.img");
    write_initramfs(&BuildInitramfsArgs {
        kernel_modules: Some(modules),
        guest_init,
        out: initramfs.clone(),
    })
    .unwrap();

    // Disks: root (busybox), scratch (empty), one volume.
    let tree = dir.path().join("rootfs");
    for d in ["bin", "etc", "proc", "sys", "dev", "run", "tmp"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "stat", "echo", "grep", "dd", "ping", "ip", "ls",
    ] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(tree.join("etc/marker"), "from the root image\n").unwrap();
    std::fs::create_dir_all(tree.join("d")).unwrap();
    std::fs::write(tree.join("d/x"), "x\n").unwrap();
    let mut layers = Vec::new();
    for i in 1..=upper_layers {
        let t = dir.path().join(format!("layer-tree-{i}"));
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(t.join(format!("layer-{i}")), format!("layer {i}\n")).unwrap();
        if i == 1 {
            std::fs::create_dir_all(t.join("etc")).unwrap();
            whiteout(&t.join("etc/marker"));
            std::fs::create_dir_all(t.join("d")).unwrap();
            opaque(&t.join("d"));
            std::fs::write(t.join("d/y"), "y\n").unwrap();
        }
        let img = dir.path().join(format!("layer-{i}.ext4"));
        mkfs(&img, 8, Some(&t));
        layers.push(img);
    }
    let (root, scratch, volume) = (
        dir.path().join("root.ext4"),
        dir.path().join("scratch.ext4"),
        dir.path().join("volume.ext4"),
    );
    mkfs(&root, 16, Some(&tree));
    mkfs(&scratch, 16, None);
    mkfs(&volume, 8, None);
    let root_before = std::fs::read(&root).unwrap();

    // vsock: vhost-device-vsock serves the guest's vsock device and maps guest
    // connections to port 5161 onto <uds>_5161, where the agent listens.
    let uds = dir.path().join("v.sock");
    let vhost_sock = dir.path().join("vhost.sock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(async { bind_guest_listener(&uds) }).unwrap();
    let _vhost = KillOnDrop(
        Command::new(&vhost)
            .arg("--vm")
            .arg(format!(
                "guest-cid=3,socket={},uds-path={}",
                vhost_sock.display(),
                uds.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vhost-device-vsock"),
    );
    wait_for_path(&vhost_sock, Duration::from_secs(10));

    let log = dir.path().join("console.log");
    let drive = |id: &str, path: &Path, ro: bool| {
        format!(
            "id={id},file={},format=raw,if=none{}",
            path.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    let started = Instant::now();
    let mut cmd = match netns {
        // QEMU runs inside the test's network namespace, on its tap `tap0`.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c.args([
                "-netdev",
                "tap,id=net0,ifname=tap0,script=no,downscript=no",
                "-device",
                "virtio-net-device,netdev=net0",
            ]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    let mut qemu = KillOnDrop(
        cmd.args(["-M", "microvm,accel=tcg,memory-backend=mem", "-smp", "1"])
            .arg("-m")
            .arg(memory_mb.to_string())
            .arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={memory_mb}M,share=on"
            ))
            .args(["-icount", "shift=auto"])
            .args(["-no-reboot", "-nodefaults", "-no-user-config", "-nographic"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .args([
                "-append",
                "console=ttyS0 panic=1 reboot=t platform.instance_id=vm-e2e",
            ])
            .arg("-chardev")
            .arg(format!("socket,id=vsock0,path={}", vhost_sock.display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vsock0"])
            .arg("-drive")
            .arg(drive("vda", &root, true))
            .args(["-device", "virtio-blk-device,drive=vda"])
            .arg("-drive")
            .arg(drive("vdb", &scratch, false))
            .args(["-device", "virtio-blk-device,drive=vdb"])
            .arg("-drive")
            .arg(drive("vdc", &volume, false))
            .args(["-device", "virtio-blk-device,drive=vdc"])
            .args(layers.iter().enumerate().flat_map(|(i, img)| {
                let id = plfm_guest_protocol::disk_name(3 + i);
                [
                    "-drive".to_string(),
                    drive(&id, img, true),
                    "-device".to_string(),
                    format!("virtio-blk-device,drive={id}"),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu"),
    );

    // The deadline covers the TCG boot to guest init plus the guest's own 5 s.
    let events = host(&listener, &rt);
    let exited = Poll::within(Duration::from_secs(60))
        .every(Duration::from_millis(50))
        .try_until(|| qemu.0.try_wait().unwrap().ok_or(()))
        .is_ok();
    let lifetime = started.elapsed();
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    // Keep the console for debugging (target/tmp/guest-vm-console.log).
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-vm-console.log"),
        &console,
    );
    let guest_lines: String = console
        .lines()
        .filter(|l| l.contains("plfm-guest-init") || l.contains("Out of memory"))
        .map(|l| format!("{l}\n"))
        .collect();
    eprintln!("--- console (guest init lines) ---\n{guest_lines}---");
    let events = events.unwrap_or_else(|e| panic!("{e}; console:\n{console}"));
    assert!(
        exited,
        "qemu still running after the workload ended; console:\n{console}"
    );
    assert!(console.contains("rebooting to end the VM"));
    assert_eq!(
        console.matches("starting (pid 1)").count(),
        1,
        "the VM booted twice:\n{console}"
    );
    eprintln!("VM lifetime {:.2} s (TCG)", lifetime.as_secs_f64());
    Some(VmRun {
        _dir: dir,
        root,
        root_before,
        scratch,
        volume,
        events,
        console,
        lifetime,
    })
}

/// Makes `path` an overlayfs whiteout: a character device 0:0.
fn whiteout(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path; mknod has no memory preconditions.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(0, 0)) };
    assert_eq!(rc, 0, "mknod {}", path.display());
}

/// Marks `dir` opaque for overlayfs (`trusted.overlay.opaque=y`).
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
    assert_eq!(rc, 0, "setxattr {}", dir.display());
}

fn vm_config(script: &str, secrets: Option<&str>) -> Config {
    Config {
        config_version: "v1".into(),
        instance_id: "vm-e2e".into(),
        generation: 1,
        workload: WorkloadConfig {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            cwd: None,
            env: BTreeMap::new(),
            uid: 0,
            gid: 0,
            listen_port: None,
        },
        network: None,
        mounts: vec![MountConfig {
            volume_id: "vol-1".into(),
            mount_path: "/data".into(),
            read_only: false,
            filesystem: "ext4".into(),
        }],
        root_layers: 1,
        secrets: secrets.map(|s| SecretsConfig {
            required: true,
            path: "/run/secrets/platform.env".into(),
            mode: 0o400,
            uid: None,
            gid: None,
            data: Some(SecretsData::new(s.into())),
        }),
    }
}

#[test]
fn vm_runs_a_workload_over_hybrid_vsock_with_overlay_root_secrets_and_volume() {
    let script = "set -e
echo 'written in the VM' > /written-by-workload
cat /run/secrets/platform.env > /data/secrets.copy
stat -c '%a' /run/secrets/platform.env > /data/secrets.mode
cat /etc/marker > /data/marker.txt
exit 7";
    let secrets = "# TRC_SECRETS_V1\nDB_PASSWORD=vm-secret\n";
    let Some(vm) = run_vm(vm_config(script, Some(secrets)), 256, None) else {
        return;
    };
    assert!(
        !vm.console.contains("vm-secret"),
        "secret value on the console"
    );
    assert!(vm.console.contains("(move+chroot (initramfs root))"));
    assert_eq!(vm.events[0], GuestEvent::ConfigApplied, "{:?}", vm.events);
    assert!(
        matches!(vm.events[1], GuestEvent::WorkloadStarted { .. }),
        "{:?}",
        vm.events
    );
    assert_eq!(
        vm.events.last(),
        Some(&GuestEvent::Exited {
            code: Some(7),
            signal: None,
            oom_killed: false
        }),
        "{:?}",
        vm.events
    );
    assert_eq!(
        debugfs_cat(&vm.scratch, "/upper/written-by-workload").as_deref(),
        Some("written in the VM\n")
    );
    assert!(
        std::fs::read(&vm.root).unwrap() == vm.root_before,
        "root image changed"
    );
    assert_eq!(
        debugfs_cat(&vm.volume, "/secrets.copy").as_deref(),
        Some(secrets)
    );
    assert_eq!(
        debugfs_cat(&vm.volume, "/secrets.mode").as_deref(),
        Some("400\n")
    );
    assert_eq!(
        debugfs_cat(&vm.volume, "/marker.txt").as_deref(),
        Some("from the root image\n")
    );
    assert!(vm.lifetime < Duration::from_secs(90));
}

/// A VM whose root is stacked from three read-only layer disks: the guest kernel names
/// the disks in the order QEMU is given them (root layer 0 `vda`, scratch `vdb`,
/// the volume `vdc`, layers 1 and 2 `vdd` and `vde`), and guest init overlays them so
/// the workload sees the whiteout and the opaque directory of layer 1 and the files
/// of both upper layers.
#[test]
fn vm_boots_a_root_stacked_from_three_layer_disks() {
    let script = "set -e
echo \"marker=$(test -e /etc/marker && echo present || echo gone) d=$(ls /d) l1=$(cat /layer-1) l2=$(cat /layer-2)\" > /data/merged.txt
exit 3";
    let mut config = vm_config(script, None);
    config.root_layers = 3;
    let Some(vm) = run_vm(config, 256, None) else {
        return;
    };
    assert_eq!(
        vm.events.last(),
        Some(&GuestEvent::Exited {
            code: Some(3),
            signal: None,
            oom_killed: false
        }),
        "{:?}\n{}",
        vm.events,
        vm.console
    );
    assert!(
        vm.console
            .contains("root is the overlay of /dev/vdb on /dev/vde on /dev/vdd on /dev/vda"),
        "{}",
        vm.console
    );
    assert_eq!(
        debugfs_cat(&vm.volume, "/merged.txt").as_deref(),
        Some("marker=gone d=y l1=layer 1 l2=layer 2\n")
    );
}

#[test]
fn vm_reports_a_workload_killed_by_the_guest_oom_killer() {
    // Four dd processes each allocate and fill a 64 MiB buffer (each below the
    // overcommit limit, together above what a 192 MiB VM has), so the guest kernel
    // OOM-kills at least one of them.
    let script = "for i in 1 2 3 4; do dd if=/dev/zero of=/dev/null bs=64M count=1 & done; wait";
    let Some(vm) = run_vm(vm_config(script, None), 192, None) else {
        return;
    };
    let last = vm.events.last().cloned();
    assert!(
        matches!(
            last,
            Some(GuestEvent::Exited {
                oom_killed: true,
                ..
            })
        ),
        "{:?}; console:\n{}",
        vm.events,
        vm.console
    );
    assert_eq!(
        last.and_then(|e| e.reason()),
        Some(plfm_node_agent::instance::ReasonCode::OomKilled)
    );
}

/// A network namespace with a tap `tap0` (169.254.0.1/30, fe80::1/64), deleted on drop.
struct NetNs(String);

impl NetNs {
    fn new() -> Result<NetNs, String> {
        let name = format!("plfm-vm-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip(&["netns", "add", &name])?;
        let ns = NetNs(name);
        ip(&["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ip(&["-n", &ns.0, "addr", "add", "169.254.0.1/30", "dev", "tap0"])?;
        ip(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            "fe80::1/64",
            "dev",
            "tap0",
            "nodad",
        ])?;
        ip(&["-n", &ns.0, "link", "set", "tap0", "mtu", "1400", "up"])?;
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.0, "link", "del", "tap0"])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn vm_configures_eth0_over_virtio_net() {
    if !is_root() || !Path::new("/dev/net/tun").exists() {
        return require("root and /dev/net/tun (tap device in a test network namespace)");
    }
    let ns = match NetNs::new() {
        Ok(ns) => ns,
        Err(e) => return require(&format!("a network namespace with a tap: {e}")),
    };
    let script = "ip addr show eth0 > /data/ip.txt
ip route > /data/route4.txt
ip -6 route > /data/route6.txt
ping -c 1 -W 10 169.254.0.1 > /data/ping.txt 2>&1
echo \"ping exit $?\" >> /data/ping.txt
cat /etc/resolv.conf > /data/resolv.txt";
    let mut config = vm_config(script, None);
    config.network = Some(NetworkConfig {
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
    let Some(vm) = run_vm(config, 256, Some(&ns.0)) else {
        return;
    };
    assert!(
        vm.console
            .contains("eth0: mtu 1400, fd00::2/128, 169.254.0.2/30"),
        "{}",
        vm.console
    );
    let file = |p: &str| debugfs_cat(&vm.volume, p).unwrap_or_else(|| panic!("{p} missing"));
    let ip = file("/ip.txt");
    assert!(
        ip.contains("mtu 1400")
            && ip.contains("inet 169.254.0.2/30")
            && ip.contains("inet6 fd00::2/128"),
        "{ip}"
    );
    assert!(file("/route4.txt").contains("default via 169.254.0.1 dev eth0"));
    assert!(file("/route6.txt").contains("default via fe80::1 dev eth0"));
    let ping = file("/ping.txt");
    assert!(ping.contains("ping exit 0"), "{ping}");
    assert_eq!(file("/resolv.txt"), "nameserver fd00::53\n");
    assert_eq!(
        vm.events.last(),
        Some(&GuestEvent::Exited {
            code: Some(0),
            signal: None,
            oom_killed: false
        })
    );
}

/// The agent goes away while the workload runs (its end of the vsock channel closes):
/// guest init reconnects through vhost-device-vsock, is adopted by a new host side,
/// which stops the workload and receives its exit.
#[test]
fn vm_guest_reconnects_to_a_restarted_agent() {
    let script = "trap 'exit 5' TERM; while :; do sleep 0.1; done";
    let Some(vm) = run_vm_with(256, None, 0, |listener, rt| {
        rt.block_on(async {
            let mut first = accept_guest(
                listener,
                "vm-e2e",
                vm_config(script, None),
                Duration::from_secs(90),
            )
            .await?;
            let pid = loop {
                match tokio::time::timeout(Duration::from_secs(60), first.next_event()).await {
                    Ok(Ok(GuestEvent::WorkloadStarted { pid, .. })) => break pid,
                    Ok(Ok(_)) => continue,
                    other => panic!("{other:?}"),
                }
            };
            drop(first); // the agent is gone
            let mut second = accept_guest(
                listener,
                "vm-e2e",
                vm_config("exit 99", None),
                Duration::from_secs(30),
            )
            .await?;
            assert!(second.hello().resumed);
            let ev = tokio::time::timeout(Duration::from_secs(30), second.next_event()).await;
            assert!(
                matches!(ev, Ok(Ok(GuestEvent::WorkloadStarted { pid: p, .. })) if p == pid),
                "{ev:?}"
            );
            second.request_stop(Duration::from_secs(10)).await?;
            collect_events(second).await
        })
    }) else {
        return;
    };
    assert!(
        vm.console.contains("reconnected to the host"),
        "{}",
        vm.console
    );
    assert_eq!(
        vm.events.last(),
        Some(&GuestEvent::Exited {
            code: Some(5),
            signal: None,
            oom_killed: false
        }),
        "{:?}",
        vm.events
    );
}
