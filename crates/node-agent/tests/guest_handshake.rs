//! Host side of the guest handshake against a scripted guest over a real Unix socket:
//! the accepted sequence, refusals (wrong instance, wrong protocol), deadlines, guest
//! failures and their reason codes, events after ack, and the stop request.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use plfm_guest_protocol::{
    Config, FailureReason, GuestMessage, Hello, HostMessage, MessageReader, MessageWriter,
    SecretsConfig, SecretsData, StatusEvent, WorkloadConfig,
};
use plfm_node_agent::guest::{
    accept_guest, bind_guest_listener, guest_socket_path, GuestError, GuestEvent,
};
use plfm_node_agent::instance::ReasonCode;

fn config(instance: &str) -> Config {
    Config {
        config_version: "v1".into(),
        instance_id: instance.into(),
        generation: 1,
        workload: WorkloadConfig {
            argv: vec!["/bin/true".into()],
            cwd: None,
            env: BTreeMap::new(),
            uid: 0,
            gid: 0,
            listen_port: None,
        },
        network: None,
        mounts: vec![],
        root_layers: 1,
        secrets: Some(SecretsConfig {
            required: true,
            path: "/run/secrets/platform.env".into(),
            mode: 0o400,
            uid: None,
            gid: None,
            data: Some(SecretsData::new("# TRC_SECRETS_V1\nK=topsecret\n".into())),
        }),
    }
}

/// A scripted guest: connects, says hello, then runs `script` on the channel.
fn guest<F>(sock: &Path, instance: &str, protocol: u32, script: F) -> std::thread::JoinHandle<()>
where
    F: FnOnce(&mut MessageReader<UnixStream>, &mut MessageWriter<UnixStream>) + Send + 'static,
{
    let sock = sock.to_path_buf();
    let instance = instance.to_string();
    std::thread::spawn(move || {
        let s = UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = MessageReader::new(s.try_clone().unwrap());
        let mut w = MessageWriter::new(s);
        w.write_message(&GuestMessage::Hello(Hello {
            guest_init_version: "test".into(),
            protocol,
            instance_id: instance,
            boot_id: "boot-1".into(),
            resumed: false,
        }))
        .unwrap();
        script(&mut r, &mut w);
    })
}

fn socket_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    (dir, uds)
}

#[tokio::test]
async fn handshake_then_events_then_stop() {
    let (_dir, uds) = socket_dir();
    let listener = bind_guest_listener(&uds).unwrap();
    assert!(guest_socket_path(&uds).exists());
    let g = guest(&guest_socket_path(&uds), "inst-1", 1, |r, w| {
        let Some(HostMessage::Config(cfg)) = r.read_message::<HostMessage>().unwrap() else {
            panic!("no config")
        };
        assert_eq!(cfg.instance_id, "inst-1");
        assert_eq!(
            cfg.secrets.unwrap().data.unwrap().expose(),
            "# TRC_SECRETS_V1\nK=topsecret\n"
        );
        w.write_message(&GuestMessage::Ack).unwrap();
        w.write_message(&GuestMessage::Status(StatusEvent::ConfigApplied))
            .unwrap();
        w.write_message(&GuestMessage::Status(StatusEvent::WorkloadStarted {
            pid: 7,
            init_us: Some(12_000),
            handshake_wait_us: Some(2_000),
        }))
        .unwrap();
        let stop = r.read_message::<HostMessage>().unwrap();
        assert_eq!(stop, Some(HostMessage::Stop { deadline_ms: 1500 }));
        w.write_message(&GuestMessage::Status(StatusEvent::Exited {
            code: None,
            signal: Some(15),
            oom_killed: false,
        }))
        .unwrap();
    });
    let mut s = accept_guest(
        &listener,
        "inst-1",
        config("inst-1"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(s.hello().boot_id, "boot-1");
    assert_eq!(s.next_event().await.unwrap(), GuestEvent::ConfigApplied);
    assert_eq!(
        s.next_event().await.unwrap(),
        GuestEvent::WorkloadStarted {
            pid: 7,
            init_time: Some(Duration::from_millis(12)),
            handshake_wait: Some(Duration::from_millis(2)),
        }
    );
    // next_event is cancel-safe: a timed-out wait loses nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(20), s.next_event())
            .await
            .is_err()
    );
    s.request_stop(Duration::from_millis(1500)).await.unwrap();
    let ev = s.next_event().await.unwrap();
    assert_eq!(
        ev,
        GuestEvent::Exited {
            code: None,
            signal: Some(15),
            oom_killed: false
        }
    );
    g.join().unwrap();
    let err = s.next_event().await.unwrap_err();
    assert!(
        matches!(err, GuestError::Closed { when: "after ack" }),
        "{err}"
    );
}

#[tokio::test]
async fn hello_from_another_instance_is_refused() {
    let (_dir, uds) = socket_dir();
    let listener = bind_guest_listener(&uds).unwrap();
    let g = guest(&guest_socket_path(&uds), "intruder", 1, |r, _w| {
        // The host closes without sending the config (and so without secrets).
        assert!(matches!(r.read_message::<HostMessage>(), Ok(None) | Err(_)));
    });
    let err = accept_guest(
        &listener,
        "inst-1",
        config("inst-1"),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, GuestError::WrongInstance { got, .. } if got == "intruder"),
        "{err}"
    );
    assert_eq!(err.reason(), ReasonCode::FirecrackerStartFailed);
    assert!(err.to_string().contains("\"intruder\" refused"));
    g.join().unwrap();
}

#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let (_dir, uds) = socket_dir();
    let listener = bind_guest_listener(&uds).unwrap();
    let g = guest(&guest_socket_path(&uds), "inst-1", 2, |r, _w| {
        assert!(matches!(r.read_message::<HostMessage>(), Ok(None) | Err(_)));
    });
    let err = accept_guest(
        &listener,
        "inst-1",
        config("inst-1"),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("unsupported guest protocol version 2"),
        "{err}"
    );
    assert_eq!(err.reason(), ReasonCode::FirecrackerStartFailed);
    g.join().unwrap();
}

#[tokio::test]
async fn no_guest_times_out_at_the_deadline() {
    let (_dir, uds) = socket_dir();
    let listener = bind_guest_listener(&uds).unwrap();
    let t = Instant::now();
    let err = accept_guest(
        &listener,
        "inst-1",
        config("inst-1"),
        Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(matches!(
        err,
        GuestError::HandshakeTimeout {
            waiting_for: "connection",
            ..
        }
    ));
    assert_eq!(err.reason(), ReasonCode::FirecrackerStartFailed);
}

#[tokio::test]
async fn silent_guest_times_out_waiting_for_ack() {
    let (_dir, uds) = socket_dir();
    let listener = bind_guest_listener(&uds).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let g = guest(&guest_socket_path(&uds), "inst-1", 1, move |r, _w| {
        let _ = r.read_message::<HostMessage>();
        // Keep the connection open without answering until the host gave up.
        let _ = rx.recv_timeout(Duration::from_secs(10));
    });
    let err = accept_guest(
        &listener,
        "inst-1",
        config("inst-1"),
        Duration::from_millis(400),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            GuestError::HandshakeTimeout {
                waiting_for: "ack",
                ..
            }
        ),
        "{err}"
    );
    tx.send(()).unwrap();
    g.join().unwrap();
}

#[tokio::test]
async fn guest_refusing_the_config_reports_its_reason() {
    let (_dir, uds) = socket_dir();
    let listener = bind_guest_listener(&uds).unwrap();
    let g = guest(&guest_socket_path(&uds), "inst-1", 1, |r, w| {
        let _ = r.read_message::<HostMessage>().unwrap();
        w.write_message(&GuestMessage::Status(StatusEvent::Failed {
            reason: FailureReason::SecretsInjectionFailed,
            detail: "secrets file line 2: duplicate key K".into(),
        }))
        .unwrap();
    });
    let err = accept_guest(
        &listener,
        "inst-1",
        config("inst-1"),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), ReasonCode::SecretsInjectionFailed);
    assert!(err.to_string().contains("duplicate key K"));
    g.join().unwrap();
}

#[tokio::test]
async fn guest_gone_before_ack_is_a_start_failure() {
    let (_dir, uds) = socket_dir();
    let listener = bind_guest_listener(&uds).unwrap();
    let g = guest(&guest_socket_path(&uds), "inst-1", 1, |r, _w| {
        let _ = r.read_message::<HostMessage>().unwrap();
    });
    let err = accept_guest(
        &listener,
        "inst-1",
        config("inst-1"),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, GuestError::Closed { when: "before ack" }),
        "{err}"
    );
    assert_eq!(err.reason(), ReasonCode::FirecrackerStartFailed);
    g.join().unwrap();
}

#[tokio::test]
async fn failures_and_oom_after_ack_carry_reason_codes() {
    let (_dir, uds) = socket_dir();
    let listener = bind_guest_listener(&uds).unwrap();
    let g = guest(&guest_socket_path(&uds), "inst-1", 1, |r, w| {
        let _ = r.read_message::<HostMessage>().unwrap();
        w.write_message(&GuestMessage::Ack).unwrap();
        w.write_message(&GuestMessage::Status(StatusEvent::Failed {
            reason: FailureReason::NetworkSetupFailed,
            detail: "eth0: No such device".into(),
        }))
        .unwrap();
        w.write_message(&GuestMessage::Status(StatusEvent::Exited {
            code: None,
            signal: Some(9),
            oom_killed: true,
        }))
        .unwrap();
    });
    let mut s = accept_guest(
        &listener,
        "inst-1",
        config("inst-1"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let ev = s.next_event().await.unwrap();
    assert_eq!(ev.reason(), Some(ReasonCode::NetworkSetupFailed));
    let ev = s.next_event().await.unwrap();
    assert_eq!(ev.reason(), Some(ReasonCode::OomKilled));
    g.join().unwrap();
}

#[tokio::test]
async fn stale_socket_file_is_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let (_dir, uds) = socket_dir();
    let path = guest_socket_path(&uds);
    std::fs::write(&path, b"stale").unwrap();
    let listener = bind_guest_listener(&uds).unwrap();
    // The stale file is gone: a socket took its place, and it is the listener's.
    assert!(
        std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket(),
        "{} is still not a socket",
        path.display()
    );
    let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (mut accepted, _) = listener.accept().await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    client.write_all(b"hi").await.unwrap();
    let mut got = [0u8; 2];
    accepted.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hi");
}
