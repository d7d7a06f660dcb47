use std::collections::BTreeMap;
use std::io::{self, Read};

use super::*;

fn config() -> Config {
    Config {
        config_version: CONFIG_VERSION.into(),
        instance_id: "inst-1".into(),
        generation: 7,
        workload: WorkloadConfig {
            argv: vec!["/bin/app".into(), "--port".into(), "8080".into()],
            cwd: Some("/srv".into()),
            env: BTreeMap::from([("A".into(), "1".into())]),
            uid: 1000,
            gid: 1000,
            listen_port: None,
        },
        network: Some(NetworkConfig {
            address: "fd00::2".parse().unwrap(),
            prefix_len: 128,
            gateway: Some("fe80::1".parse().unwrap()),
            mtu: 1420,
            dns: vec!["fd00::53".parse().unwrap()],
            ipv4: Some(Ipv4Config {
                address: "169.254.0.2".parse().unwrap(),
                prefix_len: 30,
                gateway: Some("169.254.0.1".parse().unwrap()),
            }),
        }),
        mounts: vec![MountConfig {
            volume_id: "vol-a".into(),
            mount_path: "/data".into(),
            read_only: false,
            filesystem: "ext4".into(),
        }],
        root_layers: 3,
        secrets: Some(SecretsConfig {
            required: true,
            path: DEFAULT_SECRETS_PATH.into(),
            mode: 0o400,
            uid: None,
            gid: None,
            data: Some(SecretsData::new(
                "# TRC_SECRETS_V1\nDB_PASSWORD=hunter2\n".into(),
            )),
        }),
    }
}

fn roundtrip_guest(msg: GuestMessage) {
    let line = encode_line(&msg, MAX_LINE_BYTES).unwrap();
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    let back: GuestMessage = decode_line(&line[..line.len() - 1]).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn guest_messages_round_trip() {
    roundtrip_guest(GuestMessage::Hello(Hello {
        guest_init_version: "0.1.0".into(),
        protocol: 1,
        instance_id: "inst-1".into(),
        boot_id: "b".into(),
        resumed: false,
    }));
    roundtrip_guest(GuestMessage::Ack);
    roundtrip_guest(GuestMessage::Status(StatusEvent::ConfigApplied));
    roundtrip_guest(GuestMessage::Status(StatusEvent::WorkloadStarted {
        pid: 42,
        init_us: Some(1200),
        handshake_wait_us: None,
    }));
    roundtrip_guest(GuestMessage::Status(StatusEvent::Exited {
        code: None,
        signal: Some(9),
        oom_killed: true,
    }));
    for reason in FailureReason::ALL {
        roundtrip_guest(GuestMessage::Status(StatusEvent::Failed {
            reason,
            detail: "x".into(),
        }));
    }
}

#[test]
fn host_messages_round_trip() {
    for msg in [
        HostMessage::Config(config()),
        HostMessage::Stop {
            deadline_ms: 10_000,
        },
    ] {
        let line = encode_line(&msg, MAX_LINE_BYTES).unwrap();
        let back: HostMessage = decode_line(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, msg);
    }
}

#[test]
fn wire_shape_is_the_documented_one() {
    let exited = GuestMessage::Status(StatusEvent::Exited {
        code: Some(3),
        signal: None,
        oom_killed: false,
    });
    assert_eq!(
        serde_json::to_value(&exited).unwrap(),
        serde_json::json!({"type": "status", "event": "exited", "code": 3, "signal": null, "oom_killed": false})
    );
    let failed = GuestMessage::Status(StatusEvent::Failed {
        reason: FailureReason::NetworkSetupFailed,
        detail: "eth0: no such device".into(),
    });
    assert_eq!(
        serde_json::to_value(&failed).unwrap(),
        serde_json::json!({"type": "status", "event": "failed", "reason": "network_setup_failed", "detail": "eth0: no such device"})
    );
    assert_eq!(
        serde_json::to_value(HostMessage::Stop { deadline_ms: 5 }).unwrap(),
        serde_json::json!({"type": "stop", "deadline_ms": 5})
    );
    assert_eq!(
        serde_json::to_value(GuestMessage::Ack).unwrap(),
        serde_json::json!({"type": "ack"})
    );
    let cfg = serde_json::to_value(HostMessage::Config(config())).unwrap();
    assert_eq!(cfg["type"], "config");
    assert_eq!(cfg["config_version"], "v1");
    assert_eq!(cfg["secrets"]["mode"], 256);
    assert_eq!(cfg["root_layers"], 3);
    assert_eq!(
        cfg["secrets"]["data"],
        "# TRC_SECRETS_V1\nDB_PASSWORD=hunter2\n"
    );
}

#[test]
fn failure_reasons_use_design_reason_code_names() {
    let names: Vec<_> = FailureReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        names,
        [
            "firecracker_start_failed",
            "rootfs_build_failed",
            "network_setup_failed",
            "volume_attach_failed",
            "secrets_missing",
            "secrets_injection_failed",
            "oom_killed"
        ]
    );
    for r in FailureReason::ALL {
        assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let hello: GuestMessage = decode_line(
        br#"{"type":"hello","guest_init_version":"9","protocol":1,"instance_id":"i","boot_id":"b","future":{"x":1}}"#,
    )
    .unwrap();
    assert!(matches!(hello, GuestMessage::Hello(h) if h.instance_id == "i"));
    let ev: GuestMessage = decode_line(
        br#"{"type":"status","event":"exited","code":0,"signal":null,"oom_killed":false,"cpu_ms":5}"#,
    )
    .unwrap();
    assert!(matches!(
        ev,
        GuestMessage::Status(StatusEvent::Exited { code: Some(0), .. })
    ));
    let cfg: HostMessage = decode_line(
        br#"{"type":"config","config_version":"v1","instance_id":"i","generation":1,"new_top":true,
            "workload":{"argv":["/bin/true"],"nice":3},"mounts":[{"volume_id":"v","mount_path":"/d","x":1}]}"#,
    )
    .unwrap();
    let HostMessage::Config(cfg) = cfg else {
        panic!("not a config")
    };
    assert_eq!(cfg.mounts[0].filesystem, "ext4");
    assert_eq!(cfg.workload.uid, 0);
    assert!(cfg.network.is_none() && cfg.secrets.is_none());
}

#[test]
fn a_config_without_root_layers_is_one_flattened_root_disk() {
    // What a host from before layer stacks sends: no root_layers field.
    let cfg: HostMessage = decode_line(
        br#"{"type":"config","config_version":"v1","instance_id":"i","generation":1,"workload":{"argv":["/bin/true"]}}"#,
    )
    .unwrap();
    let HostMessage::Config(cfg) = cfg else {
        panic!("not a config")
    };
    assert_eq!(cfg.root_layers, 1);
    let cfg: HostMessage = decode_line(
        br#"{"type":"config","config_version":"v1","instance_id":"i","generation":1,"workload":{"argv":["/bin/true"]},"root_layers":4}"#,
    )
    .unwrap();
    assert!(matches!(cfg, HostMessage::Config(c) if c.root_layers == 4));
}

#[test]
fn wrong_protocol_version_is_refused() {
    let msg: GuestMessage = decode_line(
        br#"{"type":"hello","guest_init_version":"9","protocol":2,"instance_id":"i","boot_id":"b"}"#,
    )
    .unwrap();
    let GuestMessage::Hello(hello) = msg else {
        panic!("not a hello")
    };
    let err = hello.check_protocol().unwrap_err();
    assert!(matches!(
        err,
        ProtocolError::UnsupportedProtocol {
            got: 2,
            supported: 1
        }
    ));
    assert_eq!(
        err.to_string(),
        "unsupported guest protocol version 2 (supported: 1)"
    );
    let mut cfg = config();
    cfg.config_version = "v2".into();
    assert!(matches!(
        cfg.check_version(),
        Err(ProtocolError::UnsupportedConfigVersion { .. })
    ));
    assert!(config().check_version().is_ok());
}

#[test]
fn over_long_line_is_rejected() {
    let long = format!("{{\"type\":\"ack\",\"pad\":\"{}\"}}\n", "x".repeat(200));
    let mut r = MessageReader::with_limit(long.as_bytes(), 64);
    let err = r.read_message::<GuestMessage>().unwrap_err();
    assert!(matches!(err, ProtocolError::LineTooLong { limit: 64 }));
    assert_eq!(err.to_string(), "message line longer than 64 bytes refused");

    // Without any newline the reader stops buffering at the limit as well.
    let endless = io::repeat(b'x');
    let mut r = MessageReader::with_limit(endless, 1000);
    assert!(matches!(
        r.read_message::<GuestMessage>(),
        Err(ProtocolError::LineTooLong { limit: 1000 })
    ));

    // A line of exactly the limit is fine.
    let exact = r#"{"type":"ack"}"#;
    let mut r =
        MessageReader::with_limit(format!("{exact}\n").into_bytes().as_slice(), exact.len())
            .read_message::<GuestMessage>();
    assert!(matches!(r.as_mut().unwrap(), Some(GuestMessage::Ack)));

    assert!(matches!(
        encode_line(&GuestMessage::Ack, 8),
        Err(ProtocolError::LineTooLong { limit: 8 })
    ));
}

/// A line large enough to outgrow its buffer several times still encodes whole (the
/// zeroing buffer copies everything across growths).
#[test]
fn a_large_line_survives_the_buffer_growths() {
    let msg = HostMessage::Stop {
        deadline_ms: u64::MAX,
    };
    let small = encode_line(&msg, MAX_LINE_BYTES).unwrap();
    let back: HostMessage = decode_line(&small[..small.len() - 1]).unwrap();
    assert_eq!(back, msg);
    let big = GuestMessage::Status(StatusEvent::Failed {
        reason: crate::FailureReason::SecretsInjectionFailed,
        detail: "y".repeat(100_000),
    });
    let line = encode_line(&big, MAX_LINE_BYTES).unwrap();
    let back: GuestMessage = decode_line(&line[..line.len() - 1]).unwrap();
    assert_eq!(back, big);
}

#[test]
fn reader_handles_several_lines_blank_lines_and_eof() {
    let data = b"{\"type\":\"ack\"}\n\n{\"type\":\"status\",\"event\":\"config_applied\"}\r\n";
    let mut r = MessageReader::new(&data[..]);
    assert_eq!(
        r.read_message::<GuestMessage>().unwrap(),
        Some(GuestMessage::Ack)
    );
    assert_eq!(
        r.read_message::<GuestMessage>().unwrap(),
        Some(GuestMessage::Status(StatusEvent::ConfigApplied))
    );
    assert_eq!(r.read_message::<GuestMessage>().unwrap(), None);

    let mut r = MessageReader::new(&b"{\"type\":\"a"[..]);
    assert!(matches!(
        r.read_message::<GuestMessage>(),
        Err(ProtocolError::TruncatedLine { pending: 10 })
    ));
}

/// Returns its data in small pieces with a timeout between them.
struct Trickle {
    pieces: Vec<Vec<u8>>,
    timeout_next: bool,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.timeout_next = !self.timeout_next;
        if !self.timeout_next {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "later"));
        }
        if self.pieces.is_empty() {
            return Ok(0);
        }
        let p = self.pieces.remove(0);
        buf[..p.len()].copy_from_slice(&p);
        Ok(p.len())
    }
}

#[test]
fn timeouts_lose_no_partial_line() {
    let mut r = MessageReader::new(Trickle {
        pieces: vec![b"{\"type\":".to_vec(), b"\"ack\"}\n".to_vec()],
        timeout_next: false,
    });
    let mut timeouts = 0;
    let msg = loop {
        match r.read_message::<GuestMessage>() {
            Ok(m) => break m,
            Err(e) if e.is_timeout() => timeouts += 1,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(msg, Some(GuestMessage::Ack));
    assert!(timeouts >= 1);
}

#[test]
fn secrets_never_appear_in_debug_or_errors() {
    let cfg = config();
    let dbg = format!("{:?}", HostMessage::Config(cfg));
    assert!(!dbg.contains("hunter2"), "{dbg}");
    assert!(dbg.contains("redacted"));
    // A type error on the secrets field must not echo the value.
    let err = decode_line::<HostMessage>(
        br#"{"type":"config","config_version":"v1","instance_id":"i","generation":1,
            "workload":{"argv":[]},"secrets":{"required":true,"mode":"hunter2"}}"#,
    )
    .unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"));
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn async_reader_and_writer_speak_the_same_framing() {
    let (a, b) = tokio::io::duplex(64);
    let mut w = AsyncMessageWriter::new(a);
    let mut r = AsyncMessageReader::new(b);
    let cfg = HostMessage::Config(config());
    let sent = cfg.clone();
    let writer = tokio::spawn(async move {
        w.write_message(&sent).await.unwrap();
        w.write_message(&HostMessage::Stop { deadline_ms: 1 })
            .await
            .unwrap();
        w.shutdown().await.unwrap();
    });
    assert_eq!(r.read_message::<HostMessage>().await.unwrap(), Some(cfg));
    assert_eq!(
        r.read_message::<HostMessage>().await.unwrap(),
        Some(HostMessage::Stop { deadline_ms: 1 })
    );
    assert_eq!(r.read_message::<HostMessage>().await.unwrap(), None);
    writer.await.unwrap();
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn async_reader_is_cancel_safe() {
    use tokio::io::AsyncWriteExt;
    let (mut a, b) = tokio::io::duplex(1024);
    let mut r = AsyncMessageReader::new(b);
    a.write_all(b"{\"type\":").await.unwrap();
    // Cancel a read that has consumed half a line.
    let res = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        r.read_message::<GuestMessage>(),
    )
    .await;
    assert!(res.is_err());
    a.write_all(b"\"ack\"}\n").await.unwrap();
    assert_eq!(
        r.read_message::<GuestMessage>().await.unwrap(),
        Some(GuestMessage::Ack)
    );
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn async_reader_rejects_over_long_lines() {
    use tokio::io::AsyncWriteExt;
    let (mut a, b) = tokio::io::duplex(4096);
    let mut r = AsyncMessageReader::with_limit(b, 100);
    a.write_all(&[b'x'; 500]).await.unwrap();
    assert!(matches!(
        r.read_message::<GuestMessage>().await,
        Err(ProtocolError::LineTooLong { limit: 100 })
    ));
}

#[test]
fn resumed_hello_is_optional_on_the_wire() {
    let mut hello = Hello {
        guest_init_version: "1".into(),
        protocol: 1,
        instance_id: "i".into(),
        boot_id: "b".into(),
        resumed: false,
    };
    let v = serde_json::to_value(GuestMessage::Hello(hello.clone())).unwrap();
    assert!(v.get("resumed").is_none(), "{v}");
    hello.resumed = true;
    let v = serde_json::to_value(GuestMessage::Hello(hello)).unwrap();
    assert_eq!(v["resumed"], true);
    let old: GuestMessage =
        decode_line(br#"{"type":"hello","guest_init_version":"1","protocol":1,"instance_id":"i","boot_id":"b"}"#)
            .unwrap();
    assert!(matches!(old, GuestMessage::Hello(h) if !h.resumed));
}
