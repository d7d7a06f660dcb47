//! The platform initramfs boots: `build-initramfs` (the library function behind it) with
//! the modules of Debian's `linux-image-cloud-amd64` and the static guest init produces
//! an image that `qemu-system-x86_64 -M microvm,accel=tcg` boots to guest init's first
//! console line; guest init then loads the modules, fails the handshake (the VM has no
//! vsock device) with a clear console line within its 5 s deadline, and reboots, which
//! ends QEMU (`-no-reboot`).
//!
//! Prerequisites: qemu-system-x86_64, a `/boot/vmlinuz-*-cloud-amd64` kernel with its
//! `/lib/modules/<version>` (or `PLFM_TEST_KERNEL` + `PLFM_TEST_KERNEL_MODULES`), and the
//! static guest init (`PLFM_GUEST_INIT_BIN`, else built with scripts/build-guest-init.sh).
//! Missing prerequisites skip the test with a message, or fail it when
//! `PLFM_REQUIRE_SYSTEM_TESTS=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plfm_node_agent::initramfs::{write_initramfs, BuildInitramfsArgs};

fn require(what: &str) {
    if std::env::var("PLFM_REQUIRE_SYSTEM_TESTS").as_deref() == Ok("1") {
        panic!("system test prerequisite missing: {what} (PLFM_REQUIRE_SYSTEM_TESTS=1)");
    }
    eprintln!("SKIPPED: system test prerequisite missing: {what}");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn find_kernel() -> Option<(PathBuf, PathBuf)> {
    if let (Ok(k), Ok(m)) = (
        std::env::var("PLFM_TEST_KERNEL"),
        std::env::var("PLFM_TEST_KERNEL_MODULES"),
    ) {
        return Some((k.into(), m.into()));
    }
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    kernels.sort();
    let kernel = kernels.pop()?;
    let version = kernel
        .file_name()?
        .to_str()?
        .strip_prefix("vmlinuz-")?
        .to_string();
    let modules = PathBuf::from("/lib/modules").join(version);
    modules
        .join("modules.dep")
        .exists()
        .then_some((kernel, modules))
}

/// The static guest init: `PLFM_GUEST_INIT_BIN`, or built by the project's script.
fn static_guest_init() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PLFM_GUEST_INIT_BIN") {
        return Some(p.into());
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/build-guest-init.sh"))
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let path = String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .last()?
        .trim()
        .to_string();
    Some(path.into())
}

/// Kills and reaps QEMU when the test ends, pass or fail.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_line(
    log: &Path,
    needle: &str,
    deadline: Instant,
    qemu: &mut Child,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(start.elapsed());
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains(needle) {
                return Ok(start.elapsed());
            }
            return Err(format!(
                "qemu exited ({status}) before {needle:?}; console:\n{text}"
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no {needle:?} on the console before the deadline; console:\n{text}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
                "console=ttyS0 panic=1 reboot=k platform.instance_id=qemu-boot-test",
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
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "guest init's first console line after {:.2} s (TCG)",
        first.as_secs_f64()
    );
    if !summary.modules.is_empty() {
        wait_for_line(
            &log,
            "kernel modules from /lib/modules/plfm",
            deadline,
            &mut qemu.0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // No vsock device in this VM: the handshake fails clearly and the VM ends itself.
    let failed = wait_for_line(
        &log,
        "FAILED (firecracker_start_failed): handshake failed",
        deadline,
        &mut qemu.0,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = qemu.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "qemu still running after guest init rebooted"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let console = std::fs::read_to_string(&log).unwrap();
    eprintln!("--- console (guest init lines) ---");
    for l in console.lines().filter(|l| l.contains("plfm-guest-init")) {
        eprintln!("{l}");
    }
    assert!(console.contains("rebooting to end the VM"), "{console}");
    assert!(failed - first < Duration::from_secs(20));
    eprintln!(
        "qemu exited with {status} after {:.2} s",
        started.elapsed().as_secs_f64()
    );
}
