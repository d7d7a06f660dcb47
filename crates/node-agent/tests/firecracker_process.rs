//! The Firecracker runtime against a stand-in `firecracker` (a TEST DOUBLE built from
//! `tests/fc_standin/fake_firecracker.rs`): API socket wait, exit-code messages, API
//! faults, crash after start, adoption after an agent restart, and the graceful stop
//! order (guest stop → SendCtrlAltDel → SIGKILL) with its deadlines. Linux only.
#![cfg(target_os = "linux")]

mod common;
mod fc_standin;

use std::time::{Duration, Instant};

use fc_standin::{realistic_workload, standin_alive, wait_until, FcEnv};
use plfm_node_agent::runtime::{BootContext, Runtime, RuntimeError, VmEvent};
use plfm_node_agent::spec::InstanceId;

fn id(s: &str) -> InstanceId {
    InstanceId::parse(s).unwrap()
}

fn boot(b: &str) -> BootContext {
    BootContext {
        boot_id: b.into(),
        secrets: None,
    }
}

async fn start_err(env: &FcEnv, boot_timeout: u64, instance: &str) -> RuntimeError {
    let rt = env.runtime(boot_timeout);
    let w = realistic_workload(instance);
    let i = id(instance);
    rt.prepare(&i, &w).await.unwrap();
    let e = rt.start(&i, &w, boot("b1")).await.unwrap_err();
    rt.cleanup(&i).await.unwrap();
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_socket_that_never_appears_fails_the_start_at_its_deadline() {
    let Some(env) = FcEnv::new("no_socket") else {
        return;
    };
    let t = Instant::now();
    let e = start_err(&env, 1, "i-nosock").await;
    let took = t.elapsed();
    assert!(matches!(e, RuntimeError::VmmStart(_)), "{e:?}");
    assert!(e.to_string().contains("did not appear within 1s"), "{e}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "{took:?}"
    );
    for pid in env.pids() {
        assert!(!standin_alive(pid), "stand-in {pid} left running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_firecracker_exit_code_is_named_in_the_error() {
    let want = [
        (148, "seccomp violation"),
        (149, "SIGBUS"),
        (150, "SIGSEGV"),
        (151, "SIGXFSZ"),
        (152, "bad configuration"),
        (153, "argument parsing"),
        (154, "SIGXCPU"),
        (155, "SIGPIPE"),
        (156, "SIGHUP"),
        (157, "SIGILL"),
    ];
    for (code, meaning) in want {
        let Some(env) = FcEnv::new(&format!("exit_now:{code}")) else {
            return;
        };
        let e = start_err(&env, 5, "i-exit").await.to_string();
        assert!(
            e.contains(&format!("exit code {code} ({meaning}")),
            "{code}: {e}"
        );
        // The VMM's own output is quoted.
        assert!(
            e.contains("simulated failure before the API"),
            "{code}: {e}"
        );
        assert_eq!(
            RuntimeError::VmmStart(e.into()).reason().as_str(),
            "firecracker_start_failed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_fault_message_reaches_the_error_and_the_vmm_is_killed() {
    let Some(env) = FcEnv::new("reject:/boot-source") else {
        return;
    };
    let e = start_err(&env, 5, "i-fault").await.to_string();
    assert!(
        e.contains("PUT /boot-source: 400: fake: /boot-source refused: Invalid argument"),
        "{e}"
    );
    for pid in env.pids() {
        assert!(!standin_alive(pid));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_instance_start_is_a_vmm_exit_with_meaning_and_log_tail() {
    let Some(env) = FcEnv::new("exit_after_start:152") else {
        return;
    };
    let rt = env.runtime(5);
    let w = realistic_workload("i-crash");
    let i = id("i-crash");
    rt.prepare(&i, &w).await.unwrap();
    let vm = rt.start(&i, &w, boot("b1")).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), rt.next_event(&vm))
        .await
        .expect("an event within 10 s");
    // Before the handshake a VMM exit fails the boot (firecracker_start_failed) with
    // the exit code's meaning and the VMM's last log lines, as in every runtime.
    match ev {
        VmEvent::Failed(RuntimeError::VmmStart(cause)) => {
            let detail = cause.to_string();
            assert!(
                detail.contains("VMM exited before the guest handshake"),
                "{detail}"
            );
            assert!(
                detail.contains("exit code 152 (bad configuration)"),
                "{detail}"
            );
            assert!(detail.contains("simulated crash, exit 152"), "{detail}");
        }
        other => panic!("expected a VmmStart failure, got {other:?}"),
    }
    let dir = env.data_dir().join("instances/i-crash");
    assert!(dir.join("scratch.ext4").exists());
    rt.cleanup(&i).await.unwrap();
    // Sockets, scratch disk and records go; the logs stay (removal retires them).
    let left: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !plfm_node_agent::logstore::is_log(n))
        .collect();
    assert!(left.is_empty(), "instance files left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_stop_request_ends_the_vm_gracefully_without_ctrl_alt_del() {
    let Some(env) = FcEnv::new("run") else { return };
    let rt = env.runtime(5);
    let w = realistic_workload("i-stop");
    let i = id("i-stop");
    rt.prepare(&i, &w).await.unwrap();
    let vm = rt.start(&i, &w, boot("b1")).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), rt.next_event(&vm)).await;
    assert_eq!(ev.ok(), Some(VmEvent::WorkloadStarted));
    let out = rt.stop(&vm, Duration::from_secs(4)).await;
    assert!(out.graceful, "{out:?}");
    assert_eq!(out.exit_code, Some(0));
    let names: Vec<String> = env.events().into_iter().map(|e| e.0).collect();
    assert!(names.contains(&"guest_stop".to_string()), "{names:?}");
    assert!(!names.contains(&"ctrl_alt_del".to_string()), "{names:?}");
    rt.cleanup(&i).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_guest_stop_is_followed_by_ctrl_alt_del() {
    let Some(env) = FcEnv::new("run,ignore_stop") else {
        return;
    };
    let rt = env.runtime(5);
    let w = realistic_workload("i-cad");
    let i = id("i-cad");
    rt.prepare(&i, &w).await.unwrap();
    let vm = rt.start(&i, &w, boot("b1")).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rt.next_event(&vm))
            .await
            .ok(),
        Some(VmEvent::WorkloadStarted)
    );
    let out = rt.stop(&vm, Duration::from_secs(2)).await;
    // The guest ignored its stop: ending the VM took the VMM's own control, a forced
    // stop.
    assert!(!out.graceful, "{out:?}");
    let ev = env.events();
    let at = |n: &str| ev.iter().find(|e| e.0 == n).map(|e| e.1);
    let (stop, cad) = (at("guest_stop").unwrap(), at("ctrl_alt_del").unwrap());
    assert!(cad > stop, "CtrlAltDel must follow the guest stop");
    // After the grace period (2 s) and the guest's margin (2 s), with scheduling slack.
    assert!((3800..6000).contains(&(cad - stop)), "{}", cad - stop);
    rt.cleanup(&i).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_ignoring_everything_is_killed_at_the_deadline() {
    let Some(env) = FcEnv::new("run,ignore_stop,ignore_cad") else {
        return;
    };
    let rt = env.runtime(5);
    let w = realistic_workload("i-kill");
    let i = id("i-kill");
    rt.prepare(&i, &w).await.unwrap();
    let vm = rt.start(&i, &w, boot("b1")).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rt.next_event(&vm))
            .await
            .ok(),
        Some(VmEvent::WorkloadStarted)
    );
    let t = Instant::now();
    let out = rt.stop(&vm, Duration::from_secs(2)).await;
    let took = t.elapsed();
    assert!(!out.graceful);
    // Grace 2 s + guest margin 2 s, SendCtrlAltDel, VMM margin 3 s, SIGKILL.
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(12),
        "{took:?}"
    );
    let names: Vec<String> = env.events().into_iter().map(|e| e.0).collect();
    let pos = |n: &str| names.iter().position(|x| x == n);
    assert!(pos("guest_stop") < pos("ctrl_alt_del"), "{names:?}");
    for pid in env.pids() {
        wait_until("stand-in killed", Duration::from_secs(5), || {
            !standin_alive(pid)
        })
        .await;
    }
    rt.cleanup(&i).await.unwrap();
}

#[test]
fn running_vmm_is_adopted_after_an_agent_restart() {
    let Some(env) = FcEnv::new("run") else { return };
    let i = id("i-adopt");
    let w = realistic_workload("i-adopt");
    // First agent: start the VM, then go away (runtime and its tasks dropped).
    let first = tokio::runtime::Runtime::new().unwrap();
    let vm = first.block_on(async {
        let rt = env.runtime(5);
        rt.prepare(&i, &w).await.unwrap();
        let vm = rt.start(&i, &w, boot("b-adopt")).await.unwrap();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), rt.next_event(&vm))
                .await
                .ok(),
            Some(VmEvent::WorkloadStarted)
        );
        vm
    });
    first.shutdown_timeout(Duration::from_secs(2));
    let pid = *env.pids().first().unwrap();
    assert!(standin_alive(pid), "the VMM must survive the agent");

    // Second agent on the same data dir.
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let rt = env.runtime(5);
        let found = rt.recover().await.unwrap();
        assert_eq!(found, vec![vm.clone()], "adopted with the same boot id");
        assert!(
            env.requests()
                .iter()
                .any(|(m, p, _)| m == "GET" && p == "/"),
            "probed the API socket"
        );
        // The guest reconnects as resumed and reports its workload again.
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), rt.next_event(&vm))
                .await
                .ok(),
            Some(VmEvent::WorkloadStarted)
        );
        assert!(env.events().iter().any(|e| e.0 == "guest_resumed"));
        let out = rt.stop(&vm, Duration::from_secs(4)).await;
        assert!(out.graceful, "{out:?}");
        rt.cleanup(&i).await.unwrap();
        wait_until("VMM gone", Duration::from_secs(5), || !standin_alive(pid)).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_vmm_record_is_not_adopted() {
    let Some(env) = FcEnv::new("exit_after_start:0") else {
        return;
    };
    let rt = env.runtime(5);
    let i = id("i-dead");
    let w = realistic_workload("i-dead");
    rt.prepare(&i, &w).await.unwrap();
    let vm = rt.start(&i, &w, boot("b1")).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), rt.next_event(&vm)).await;
    let rt2 = env.runtime(5);
    assert!(rt2.recover().await.unwrap().is_empty());
    rt.cleanup(&i).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_vmm_gets_its_files_in_the_chroot_and_the_jail_is_removed() {
    let Some(env) = FcEnv::new("run") else { return };
    if !common::gate::present(
        rustix::process::geteuid().is_root(),
        "root (the jailer chowns into the jail)",
    ) {
        return;
    }
    std::fs::create_dir_all(env.data_dir()).unwrap();
    let store = plfm_node_agent::state::Store::open(&env.data_dir().join("state.db")).unwrap();
    let rt = plfm_node_agent::runtime::firecracker::FirecrackerRuntime::new(
        env.jailed_config(5),
        &env.data_dir(),
        Some(store.clone()),
        // A root stacked from three layer disks: every one is linked in like a
        // single root disk.
        std::sync::Arc::new(
            fc_standin::TestHost::new(env.root.path(), Some("plfmtest0")).with_layers(3),
        ),
    );
    let i = id("i-jail");
    let w = realistic_workload("i-jail");
    rt.prepare(&i, &w).await.unwrap();
    let vm = rt.start(&i, &w, boot("b1")).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rt.next_event(&vm))
            .await
            .ok(),
        Some(VmEvent::WorkloadStarted),
        "guest reached the vsock inside the jail"
    );
    let jail = env.path("jail/firecracker/i-jail");
    let root = jail.join("root");
    use std::os::unix::fs::MetadataExt;
    // The instance's uid from the range, held in the ledger.
    let uid: u32 = store
        .resources()
        .unwrap()
        .iter()
        .find(|r| r.kind == "uid" && r.instance_id == "i-jail")
        .expect("uid row")
        .name
        .parse()
        .unwrap();
    assert!((10001..10101).contains(&uid), "{uid}");
    // Its own files are its uid's alone; the shared ones stay root's, readable by the
    // VMMs' group (10000) and writable by no VMM.
    for f in [
        "scratch.ext4",
        "vol-a.ext4",
        "vol-b.ext4",
        "firecracker.log",
        "v.sock_5161",
    ] {
        let m = std::fs::metadata(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o777),
            (uid, 10000, 0o600),
            "{f}"
        );
    }
    for f in [
        "vmlinux",
        "initramfs.cpio.gz",
        "root.ext4",
        "layer-1.ext4",
        "layer-2.ext4",
    ] {
        let m = std::fs::metadata(root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(m.uid(), 0, "{f} was given to the VMM's uid");
        assert_eq!(
            m.mode() & 0o022,
            0,
            "{f} is writable by others: {:o}",
            m.mode()
        );
        assert!(
            m.mode() & 0o004 != 0 || (m.gid() == 10000 && m.mode() & 0o040 != 0),
            "{f} is not readable by the VMMs' group: {:o}",
            m.mode()
        );
        // A hard link: the shared file itself, not a copy.
        let src = std::fs::metadata(env.path(f)).unwrap();
        assert_eq!(src.ino(), m.ino(), "{f}");
    }
    // API paths are the jail's view.
    let reqs = env.requests();
    let body = |p: &str| {
        reqs.iter()
            .find(|r| r.1 == p)
            .and_then(|r| r.2.clone())
            .unwrap()
    };
    assert_eq!(body("/boot-source")["kernel_image_path"], "/vmlinux");
    assert_eq!(body("/drives/vdc")["path_on_host"], "/vol-a.ext4");
    for (drive, file) in [
        ("vda", "/root.ext4"),
        ("vde", "/layer-1.ext4"),
        ("vdf", "/layer-2.ext4"),
    ] {
        let b = body(&format!("/drives/{drive}"));
        assert_eq!(
            (b["path_on_host"].as_str(), b["is_read_only"].as_bool()),
            (Some(file), Some(true)),
            "{drive}"
        );
    }
    assert_eq!(body("/vsock")["uds_path"], "/v.sock");
    let out = rt.stop(&vm, Duration::from_secs(4)).await;
    assert!(out.graceful);
    rt.cleanup(&i).await.unwrap();
    assert!(!jail.exists(), "jail must be removed");
    // Volumes outlive the instance; only their jail links went.
    assert!(env.path("vol-a.ext4").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_pid_and_start_time_are_in_the_ledger_before_configuration_and_gone_after_cleanup() {
    let Some(env) = FcEnv::new("run") else { return };
    std::fs::create_dir_all(env.data_dir()).unwrap();
    let store = plfm_node_agent::state::Store::open(&env.data_dir().join("state.db")).unwrap();
    let rt = plfm_node_agent::runtime::firecracker::FirecrackerRuntime::new(
        env.config(5),
        &env.data_dir(),
        Some(store.clone()),
        std::sync::Arc::new(fc_standin::TestHost::new(env.root.path(), None)),
    );
    let i = id("i-ledger");
    let w = realistic_workload("i-ledger");
    rt.prepare(&i, &w).await.unwrap();
    let vm = rt.start(&i, &w, boot("b1")).await.unwrap();
    let rows = store.resources().unwrap();
    let proc_row = rows
        .iter()
        .find(|r| r.kind == "process" && r.instance_id == "i-ledger")
        .expect("process row");
    let detail: serde_json::Value =
        serde_json::from_str(proc_row.detail.as_deref().unwrap()).unwrap();
    let pid = detail["pid"].as_i64().unwrap() as i32;
    assert!(env.pids().contains(&pid), "{detail} vs {:?}", env.pids());
    assert!(detail["start_time"].as_u64().unwrap() > 0);
    // The root layer disks it was given, bottom first (what `describe` lists).
    assert_eq!(
        detail["root_layers"],
        serde_json::json!([env.path("root.ext4")])
    );
    // No tap from the host resources: no network interface is configured.
    assert!(!env
        .requests()
        .iter()
        .any(|r| r.1.starts_with("/network-interfaces")));
    rt.stop(&vm, Duration::from_secs(2)).await;
    rt.cleanup(&i).await.unwrap();
    assert!(store
        .resources()
        .unwrap()
        .iter()
        .all(|r| r.instance_id != "i-ledger"));
}
