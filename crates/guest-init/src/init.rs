//! The boot sequence of DESIGN §6, in order, and the one way out: report, clean up,
//! `reboot(RB_AUTOBOOT)` (or exit in test mode).
//!
//! Every step maps its failure to a [`FailureReason`] here, in [`Failure`]; the failure
//! is printed as one console line, sent to the host when the channel is up, and ends the
//! VM like a workload exit does. Nothing in this module prints secret values: secrets
//! are only handed to [`crate::secrets`].

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plfm_guest_protocol::{
    Config, FailureReason, GuestMessage, Hello, HostMessage, StatusEvent, PROTOCOL_VERSION,
};

use crate::channel::{describe, Channel};
use crate::mounts::{self, Layout};
use crate::secrets::{self, SecretsFile};
use crate::settings::{HostChannel, Settings, CMDLINE_INSTANCE_ID};
use crate::{console, env, modules, netlink, sys, workload, VERSION};

/// How long the final status may take to be confirmed by the host closing the
/// channel (see [`Channel::close_after_delivery`]) before the VM ends anyway.
const TERMINAL_DELIVERY: Duration = Duration::from_secs(2);

/// A failed step: the reason code and a one-line detail without secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Reason code.
    pub reason: FailureReason,
    /// What failed and why.
    pub detail: String,
}

fn fail(reason: FailureReason) -> impl Fn(String) -> Failure {
    move |detail| Failure { reason, detail }
}

/// How the run ended.
enum Outcome {
    Workload {
        ended: workload::Ended,
        oom_killed: bool,
    },
    Failed(Failure),
}

/// State that the exit path needs.
struct Init {
    settings: Settings,
    started: Instant,
    channel: Option<Channel>,
    /// The host sent the config: it serves the channel, so it will close it once it
    /// has the final status (a host that never answered is not waited for).
    host_answered: bool,
    /// Volume mount points, unmounted before the end.
    volumes: Vec<PathBuf>,
    /// Test mode: the host socket's directory, kept open so that the socket can still be
    /// reached (through `/proc/self/fd`) after the root switch hides the host's files.
    host_dir: Option<std::fs::File>,
    switched: bool,
}

/// Entry point of the binary.
pub fn main() -> ! {
    let started = Instant::now();
    console::line(&format!(
        "plfm-guest-init {VERSION} starting (pid {})",
        std::process::id()
    ));
    if std::process::id() != 1 {
        // Guest init kills every other process (`kill(-1)`) and reboots: only ever as
        // PID 1 of a VM or of a PID namespace (test mode), never on a host by mistake.
        console::line(
            "refusing to run: must be PID 1 (of a VM, or of a PID namespace in test mode)",
        );
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| {
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        console::line(&format!(
            "FAILED (internal error): guest init panicked{loc}"
        ));
    }));
    if let Err(e) = workload::block_signals() {
        console::line(&e);
    }
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let settings = match Settings::from_sources(&env, "") {
        Ok(s) => s,
        Err(e) => {
            console::line(&format!("FAILED (firecracker_start_failed): settings: {e}"));
            end(
                env.get("PLFM_GUEST_TEST_MODE").map(String::as_str) == Some("1"),
                1,
            )
        }
    };
    let mut init = Init {
        settings,
        started,
        channel: None,
        host_answered: false,
        volumes: Vec::new(),
        host_dir: None,
        switched: false,
    };
    let outcome = match init.boot() {
        Ok(o) => o,
        Err(f) => Outcome::Failed(f),
    };
    init.finish(outcome)
}

/// Ends the process: exit in test mode, reboot in a VM.
fn end(test_mode: bool, code: i32) -> ! {
    sys::sync();
    if test_mode {
        std::process::exit(code);
    }
    let err = sys::reboot();
    console::line(&format!("{err}; exiting"));
    std::process::exit(code)
}

impl Init {
    fn layout(&self) -> Layout {
        Layout {
            staging: self.settings.staging.clone(),
        }
    }

    /// Where to reconnect later. A vsock address stays valid; a Unix socket path (test
    /// mode) disappears with the root switch, so it is reached through an open
    /// descriptor of its directory.
    fn reconnect_target(&mut self, target: &HostChannel) -> HostChannel {
        let HostChannel::Unix(path) = target else {
            return target.clone();
        };
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return target.clone();
        };
        match std::fs::File::open(dir) {
            Ok(f) => {
                let via_fd = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())).join(name);
                self.host_dir = Some(f);
                HostChannel::Unix(via_fd)
            }
            Err(_) => target.clone(),
        }
    }

    fn boot(&mut self) -> Result<Outcome, Failure> {
        let mut phases = Phases::new(self.started);
        let start_failed = fail(FailureReason::FirecrackerStartFailed);
        let layout = self.layout();
        let test_mode = self.settings.test_mode;

        // 1. Pseudo-filesystems (in test mode inside a private tmpfs staging directory).
        if test_mode {
            sys::mount_tmpfs(&layout.staging, "mode=0755").map_err(&start_failed)?;
        }
        for step in mounts::pseudo_filesystems(&layout) {
            sys::mount_step(&step).map_err(&start_failed)?;
        }
        sys::ensure_console(&layout.staging.join("dev/console"));
        if !test_mode {
            let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
            if let Some(id) = crate::settings::cmdline_value(&cmdline, CMDLINE_INSTANCE_ID) {
                self.settings.instance_id = Some(id.to_string());
            }
        }

        phases.mark("pseudo_fs");

        // 2. Kernel modules shipped in the initramfs.
        let modules_dir = self.settings.modules_dir.clone();
        let modules_start = Instant::now();
        match modules::load_modules(&modules_dir) {
            Ok(0) => {}
            Ok(n) => console::line(&format!(
                "loaded {n} kernel modules from {} in {:.1} ms",
                modules_dir.display(),
                ms(modules_start.elapsed())
            )),
            Err(e) => console::line(&format!("kernel modules: {e}")),
        }
        if !test_mode {
            // Free the initramfs copies; the kernel keeps what it loaded.
            let _ = std::fs::remove_dir_all(&modules_dir);
        }

        phases.mark("modules");

        // Exec sessions: bound now (a test-mode socket path is gone after the root
        // switch), served once the workload runs. Without it the VM still runs.
        let exec_listener = match crate::exec::bind(&self.settings.exec) {
            Ok(l) => Some(l),
            Err(e) => {
                console::line(&format!("{e}; exec sessions are off"));
                None
            }
        };

        // 3. Handshake: hello → config → ack.
        let instance_id = self.settings.instance_id.clone().ok_or_else(|| {
            start_failed(format!(
                "no {CMDLINE_INSTANCE_ID}= on the kernel command line"
            ))
        })?;
        let hs_start = Instant::now();
        let deadline = hs_start + self.settings.handshake_timeout;
        let timeout_ms = self.settings.handshake_timeout.as_millis();
        let target = self.settings.host.clone();
        let mut channel = Channel::connect(&target, deadline)
            .map_err(|e| start_failed(format!("handshake failed: {e} within {timeout_ms} ms")))?;
        let boot_id =
            std::fs::read_to_string(layout.staging.join("proc/sys/kernel/random/boot_id"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
        let hello = Hello {
            guest_init_version: VERSION.to_string(),
            protocol: PROTOCOL_VERSION,
            instance_id: instance_id.clone(),
            boot_id,
            resumed: false,
        };
        channel
            .send(&GuestMessage::Hello(hello.clone()))
            .map_err(|e| start_failed(format!("handshake failed: send hello: {e}")))?;
        let reconnect = workload::Reconnect {
            target: self.reconnect_target(&target),
            hello,
        };
        crate::logs::start(
            crate::logs::log_target(&reconnect.target),
            instance_id.clone(),
            reconnect.hello.boot_id.clone(),
        );
        self.channel = Some(channel);
        let config = match self.channel.as_mut().map(|c| c.recv_until(deadline)) {
            Some(Ok(Some(HostMessage::Config(c)))) => c,
            Some(Ok(Some(HostMessage::Stop { .. }))) => {
                return Err(start_failed(
                    "handshake failed: host sent stop instead of config".into(),
                ))
            }
            Some(Ok(None)) => {
                self.channel = None;
                return Err(start_failed(format!(
                    "handshake failed: host at {} closed the channel before sending the config",
                    describe(&target)
                )));
            }
            Some(Err(e)) => {
                return Err(start_failed(format!(
                    "handshake failed: no config from {} within {timeout_ms} ms: {e}",
                    describe(&target)
                )))
            }
            None => return Err(start_failed("handshake failed: no channel".into())),
        };
        self.host_answered = true;
        let handshake_wait = hs_start.elapsed();
        config
            .check_version()
            .map_err(|e| start_failed(e.to_string()))?;
        if config.instance_id != instance_id {
            return Err(start_failed(format!(
                "config is for instance {:?}, this VM is {instance_id:?}",
                config.instance_id
            )));
        }
        let plan = validate(&config, &self.settings, &layout)?;
        self.send(&GuestMessage::Ack);

        phases.mark("handshake");

        // 4. Root layers, scratch disk, overlay, root switch.
        let rootfs_failed = fail(FailureReason::RootfsBuildFailed);
        for step in &plan.root {
            if step.fstype == "overlay" {
                for d in [layout.upper(), layout.work()] {
                    std::fs::create_dir_all(&d)
                        .map_err(|e| rootfs_failed(format!("mkdir {}: {e}", d.display())))?;
                }
            }
            sys::mount_step(step).map_err(&rootfs_failed)?;
        }
        let newroot = layout.newroot();
        for sub in ["proc", "sys", "dev"] {
            sys::move_mount(&layout.staging.join(sub), &newroot.join(sub))
                .map_err(&rootfs_failed)?;
        }
        if !test_mode {
            // The initramfs stays in memory under the new root; drop our binary from it.
            let _ = std::fs::remove_file("/init");
        }
        let how = sys::switch_root(&newroot).map_err(&rootfs_failed)?;
        self.switched = true;
        console::line(&format!(
            "root is the overlay of {} on {} ({how})",
            self.settings.scratch_device.display(),
            plan.layers
                .iter()
                .rev()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(" on ")
        ));

        phases.mark("root");

        // 5. tmpfs on /run and /tmp, devpts, /dev/shm.
        for step in mounts::runtime_filesystems() {
            sys::mount_step(&step).map_err(&rootfs_failed)?;
        }

        phases.mark("tmpfs");

        // 6. Network.
        configure_network(&config, &self.settings.net_iface)
            .map_err(fail(FailureReason::NetworkSetupFailed))?;

        phases.mark("network");

        // 7. Secrets.
        if let Some((path, file, mode, uid, gid)) = &plan.secrets {
            secrets::write_atomically(path, file.render().as_bytes(), *mode, *uid, *gid)
                .map_err(fail(FailureReason::SecretsInjectionFailed))?;
            console::line(&format!(
                "secrets file {} written ({} keys, mode {mode:o})",
                path.display(),
                file.keys().count()
            ));
        }

        phases.mark("secrets");

        // 8. Volumes.
        let volume_failed = fail(FailureReason::VolumeAttachFailed);
        for v in &plan.volumes {
            std::fs::create_dir_all(&v.path).map_err(|e| {
                volume_failed(format!(
                    "volume {}: mkdir {}: {e}",
                    v.volume_id,
                    v.path.display()
                ))
            })?;
            let resolved = std::fs::canonicalize(&v.path).map_err(|e| {
                volume_failed(format!(
                    "volume {}: resolve {}: {e}",
                    v.volume_id,
                    v.path.display()
                ))
            })?;
            mounts::check_reserved(&resolved).map_err(|e| {
                volume_failed(format!("volume {}: {e} (after symlinks)", v.volume_id))
            })?;
            sys::mount_ext4(&v.device, &resolved, v.flags())
                .map_err(|e| volume_failed(format!("volume {}: {e}", v.volume_id)))?;
            self.volumes.push(resolved);
        }
        self.send(&GuestMessage::Status(StatusEvent::ConfigApplied));

        phases.mark("volumes");

        // 9. The workload.
        let oom_before = workload::oom_kills();
        let pid = match workload::spawn(&config.workload, &plan.env) {
            Ok(pid) => pid,
            Err((code, detail)) => {
                console::line(&format!("{detail} (reported as exit code {code})"));
                return Ok(Outcome::Workload {
                    ended: workload::Ended::Exited(code),
                    oom_killed: false,
                });
            }
        };
        phases.mark("exec");
        if let Some(l) = exec_listener {
            crate::exec::serve(
                l,
                crate::exec::Context {
                    instance_id: instance_id.clone(),
                    workload: config.workload.clone(),
                    env: plan.env.clone(),
                },
            );
        }
        let init_elapsed = self.started.elapsed();
        console::line(&format!(
            "workload started: pid {pid}, {:.1} ms after guest init start ({:.1} ms waiting for the host, {:.1} ms own work)",
            ms(init_elapsed),
            ms(handshake_wait),
            ms(init_elapsed.saturating_sub(handshake_wait))
        ));
        console::line(&format!("timings (ms): {}", phases.render()));
        self.send(&GuestMessage::Status(StatusEvent::WorkloadStarted {
            pid: pid.as_raw() as u32,
            init_us: Some(init_elapsed.as_micros() as u64),
            handshake_wait_us: Some(handshake_wait.as_micros() as u64),
        }));
        let ended = workload::supervise(
            pid,
            &mut self.channel,
            Some(&reconnect),
            config.workload.listen_port,
        )
        .map_err(&start_failed)?;
        let oom_killed = match (oom_before, workload::oom_kills()) {
            (Some(a), Some(b)) => b > a,
            _ => false,
        };
        Ok(Outcome::Workload { ended, oom_killed })
    }

    /// Sends a message if the channel is up; a broken channel is dropped (the VM goes on).
    fn send(&mut self, msg: &GuestMessage) {
        if let Some(ch) = self.channel.as_mut() {
            if let Err(e) = ch.send(msg) {
                console::line(&format!("host channel: {e}"));
                self.channel = None;
            }
        }
    }

    fn finish(mut self, outcome: Outcome) -> ! {
        let code = match outcome {
            Outcome::Workload { ended, oom_killed } => {
                let (code, signal) = match ended {
                    workload::Ended::Exited(c) => (Some(c), None),
                    workload::Ended::Signaled(s) => (None, Some(s)),
                };
                // What the workload wrote reaches the host before its exit is told.
                crate::logs::flush(Instant::now() + Duration::from_secs(2));
                console::line(&format!(
                    "workload ended: {} {}{}",
                    if code.is_some() {
                        "exit code"
                    } else {
                        "signal"
                    },
                    code.or(signal).unwrap_or_default(),
                    if oom_killed {
                        " (the kernel OOM-killed a process)"
                    } else {
                        ""
                    }
                ));
                self.send(&GuestMessage::Status(StatusEvent::Exited {
                    code,
                    signal,
                    oom_killed,
                }));
                0
            }
            Outcome::Failed(f) => {
                console::line(&format!("FAILED ({}): {}", f.reason, f.detail));
                self.send(&GuestMessage::Status(StatusEvent::Failed {
                    reason: f.reason,
                    detail: f.detail,
                }));
                1
            }
        };
        if let Some(ch) = self.channel.take().filter(|_| self.host_answered) {
            if !ch.close_after_delivery(Instant::now() + TERMINAL_DELIVERY) {
                console::line("host channel: the host did not confirm the final status");
            }
        }
        workload::kill_and_reap_all(Duration::from_secs(2));
        for v in self.volumes.iter().rev() {
            if let Err(e) = sys::unmount(v) {
                console::line(&e);
            }
        }
        if self.switched && !self.settings.test_mode {
            let _ = sys::remount_root_readonly();
        }
        console::line(if self.settings.test_mode {
            "exiting (test mode)"
        } else {
            "rebooting to end the VM"
        });
        end(self.settings.test_mode, code)
    }
}

/// Durations of the boot phases, for the console (benchmark insight).
struct Phases {
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new(start: Instant) -> Phases {
        Phases {
            last: start,
            done: Vec::new(),
        }
    }

    /// Ends the phase `name` now.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done.push((name, now - self.last));
        self.last = now;
    }

    fn render(&self) -> String {
        self.done
            .iter()
            .map(|(n, d)| format!("{n} {:.1}", ms(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the config asks for, checked before `ack`.
struct Plan {
    env: BTreeMap<String, String>,
    /// Root layer devices, bottom first.
    layers: Vec<PathBuf>,
    /// Root layers, scratch disk and overlay, in mount order.
    root: Vec<mounts::MountStep>,
    volumes: Vec<mounts::VolumeMount>,
    secrets: Option<(PathBuf, SecretsFile, u32, u32, u32)>,
}

/// Checks everything in the config that can be checked before touching the system, so
/// that a bad config is refused instead of acknowledged.
fn validate(config: &Config, settings: &Settings, layout: &Layout) -> Result<Plan, Failure> {
    let env = env::compose_env(&config.workload.env, config.workload.uid)
        .map_err(fail(FailureReason::FirecrackerStartFailed))?;
    let rootfs_failed = fail(FailureReason::RootfsBuildFailed);
    let n = plfm_guest_protocol::disks::check_root_layers(config.root_layers)
        .map_err(&rootfs_failed)?;
    let layers = settings
        .layer_devices(n, config.mounts.len())
        .map_err(&rootfs_failed)?;
    let root =
        mounts::root_plan(layout, &layers, &settings.scratch_device).map_err(&rootfs_failed)?;
    let volumes = mounts::volume_plan(&config.mounts, |i| settings.volume_device(i))
        .map_err(fail(FailureReason::VolumeAttachFailed))?;
    let secrets = match &config.secrets {
        None => None,
        Some(s) => match &s.data {
            None if s.required => {
                return Err(Failure {
                    reason: FailureReason::SecretsMissing,
                    detail: "secrets are required but the config carries none".into(),
                })
            }
            None => None,
            Some(data) => {
                let injection = fail(FailureReason::SecretsInjectionFailed);
                let path = mounts::check_secrets_path(&s.path).map_err(&injection)?;
                let file = SecretsFile::parse(data.expose()).map_err(&injection)?;
                if s.mode & !0o777 != 0 {
                    return Err(injection(format!(
                        "secrets mode {:o} is not a permission mode",
                        s.mode
                    )));
                }
                Some((
                    path,
                    file,
                    s.mode,
                    s.uid.unwrap_or(config.workload.uid),
                    s.gid.unwrap_or(config.workload.gid),
                ))
            }
        },
    };
    Ok(Plan {
        env,
        layers,
        root,
        volumes,
        secrets,
    })
}

/// lo up; eth0 MTU, up, addresses, default routes; `/etc/resolv.conf` when DNS is given.
fn configure_network(config: &Config, iface: &str) -> Result<(), String> {
    let mut nl = netlink::Netlink::open()?;
    let lo = netlink::ifindex("lo")?;
    let seq = nl.next_seq();
    nl.request(&netlink::link_up_message(seq, lo, None), seq)
        .map_err(|e| format!("lo up: {e}"))?;
    let Some(net) = &config.network else {
        return Ok(());
    };
    let idx = netlink::ifindex(iface)?;
    let seq = nl.next_seq();
    nl.request(&netlink::link_up_message(seq, idx, Some(net.mtu)), seq)
        .map_err(|e| format!("{iface}: set mtu {} and up: {e}", net.mtu))?;
    let mut addrs = vec![(net.address, net.prefix_len, net.gateway)];
    if let Some(v4) = &net.ipv4 {
        addrs.push((v4.address.into(), v4.prefix_len, v4.gateway.map(Into::into)));
    }
    for (addr, len, _) in &addrs {
        let seq = nl.next_seq();
        nl.request(&netlink::address_message(seq, idx, *addr, *len), seq)
            .map_err(|e| format!("{iface}: add address {addr}/{len}: {e}"))?;
    }
    for (addr, len, gw) in &addrs {
        if let Some(gw) = gw {
            if gw.is_ipv4() != addr.is_ipv4() {
                return Err(format!(
                    "{iface}: gateway {gw} is not of the family of {addr}"
                ));
            }
            let seq = nl.next_seq();
            let onlink = netlink::needs_onlink(*addr, *len, *gw);
            nl.request(&netlink::default_route_message(seq, idx, *gw, onlink), seq)
                .map_err(|e| format!("{iface}: default route via {gw}: {e}"))?;
        }
    }
    if !net.dns.is_empty() {
        let text: String = net
            .dns
            .iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect();
        write_resolv_conf(Path::new("/etc/resolv.conf"), &text)?;
    }
    console::line(&format!(
        "{iface}: mtu {}, {}",
        net.mtu,
        addrs
            .iter()
            .map(|(a, l, _)| format!("{a}/{l}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(())
}

/// Replaces resolv.conf (a symlink in the image, e.g. to systemd's, is replaced too).
fn write_resolv_conf(path: &Path, text: &str) -> Result<(), String> {
    let _ = std::fs::create_dir_all("/etc");
    let tmp = path.with_extension("plfm-tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(root_layers: u32) -> Config {
        let json = serde_json::json!({
            "config_version": "v1", "instance_id": "i", "generation": 1,
            "workload": {"argv": ["/bin/true"]},
            "mounts": [{"volume_id": "vol-b", "mount_path": "/b"},
                       {"volume_id": "vol-a", "mount_path": "/a"}],
            "root_layers": root_layers
        });
        serde_json::from_value(json).unwrap()
    }

    fn vm() -> (Settings, Layout) {
        let s = Settings::from_sources(&BTreeMap::new(), "platform.instance_id=i").unwrap();
        let l = Layout {
            staging: s.staging.clone(),
        };
        (s, l)
    }

    #[test]
    fn root_layer_counts_outside_the_limit_are_refused_before_ack_naming_the_value() {
        let (s, l) = vm();
        for (n, want) in [
            (0, "root_layers is 0"),
            (17, "root_layers is 17: at most 16"),
        ] {
            let Err(f) = validate(&config(n), &s, &l) else {
                panic!("{n} root layers accepted");
            };
            assert_eq!(f.reason, FailureReason::RootfsBuildFailed);
            assert!(f.detail.contains(want), "{}", f.detail);
        }
    }

    #[test]
    fn the_plan_stacks_the_layers_on_the_devices_after_the_volumes() {
        let (s, l) = vm();
        let p = validate(&config(3), &s, &l).map_err(|f| f.detail).unwrap();
        assert_eq!(
            p.layers,
            ["/dev/vda", "/dev/vde", "/dev/vdf"].map(PathBuf::from)
        );
        let sources: Vec<&str> = p.root.iter().map(|m| m.source.as_str()).collect();
        assert_eq!(
            sources,
            ["/dev/vda", "/dev/vde", "/dev/vdf", "/dev/vdb", "overlay"]
        );
        let vols: Vec<_> = p.volumes.iter().map(|v| v.device.clone()).collect();
        assert_eq!(vols, ["/dev/vdc", "/dev/vdd"].map(PathBuf::from));
        let one = validate(&config(1), &s, &l).map_err(|f| f.detail).unwrap();
        assert_eq!(one.layers, [PathBuf::from("/dev/vda")]);
        assert_eq!(one.root.len(), 3);
    }
}
