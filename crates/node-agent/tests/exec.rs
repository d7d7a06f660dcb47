//! Exec sessions end to end: the `exec` CLI through a pseudo-terminal into a real VM
//! (qemu, TCG), the session limit and the readiness rule, the platform gateway's framing
//! (plaintext from an allowed address, refusal from others), and the gateway's mTLS.
#![cfg(target_os = "linux")]

mod common;
mod fc_standin;
mod image_support;
#[path = "support/vm_host.rs"]
mod vm_host;

/// The conformance suite's lab (not its scenarios).
#[path = "conformance/lab.rs"]
mod lab;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lab::{Behaviour, Health, Inst, Kind, Lab};
use plfm_guest_protocol::exec::{kind, read_frame, write_frame, ExecExit, ExecInit, Frame};
use plfm_node_agent::instance::Status;

fn ready(lab: &Lab, id: &str) {
    let v = lab.wait(id, "ready", lab.kind.boot_within(), |v| {
        matches!(v.status, Status::Ready | Status::Failed | Status::Stopped)
    });
    assert_eq!(v.status, Status::Ready, "{v:#?}\n{}", lab.log());
}

fn exec_cmd(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new(common::agent::BIN);
    c.arg("--config")
        .arg(lab.config_path())
        .arg("exec")
        .args(args);
    c
}

/// Kills and reaps a child when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Waits for `needle` in the agent's log (it logs a refusal after closing the
/// connection).
fn wait_log(lab: &Lab, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in the log:\n{}",
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metric(lab: &Lab, name: &str) -> Option<f64> {
    let (_, body) = lab.agent().api_get("/metrics").ok()?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_metric(lab: &Lab, name: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = metric(lab, name);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed {got:?}, want {want}\n{}",
            lab.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pseudo-terminal whose slave side is the CLI's terminal; everything the CLI prints
/// is collected from the master.
struct Pty {
    master: std::fs::File,
    seen: Arc<Mutex<Vec<u8>>>,
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl Pty {
    /// Spawns `cmd` as the session leader of a new terminal of `rows`×`cols`.
    fn spawn(mut cmd: Command, rows: u16, cols: u16) -> (Pty, Reaped) {
        let (mut m, mut s) = (0, 0);
        let ws = winsize(rows, cols);
        // SAFETY: openpty writes two descriptors into the out-pointers and reads the
        // winsize; the name and termios pointers may be null.
        let rc =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty returned two new descriptors owned by nobody else.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl(TIOCSCTTY) are async-signal-safe and run in the
        // child before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = Reaped(cmd.spawn().expect("spawn the exec CLI"));
        let master = std::fs::File::from(master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (mut r, s2) = (master.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s2.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        (Pty { master, seen }, child)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    fn send(&mut self, s: &str) {
        self.master.write_all(s.as_bytes()).unwrap();
    }

    /// Waits for `needle` in the output after byte `from`; returns where it ends.
    fn expect(&self, needle: &str, from: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let t = self.text();
            if let Some(i) = t.get(from..).and_then(|rest| rest.find(needle)) {
                return from + i + needle.len();
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} not seen within {within:?}; terminal shows:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = winsize(rows, cols);
        // SAFETY: TIOCSWINSZ reads one winsize from a pointer that outlives the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }
}

/// `exec -it <id> -- /bin/sh` driven through a terminal runs commands, passes a resize
/// (`stty size` shows it) and returns the shell's exit code.
#[test]
fn exec_it_shell_runs_commands_passes_a_resize_and_returns_the_exit_code() {
    let Some(lab) = Lab::shared(Kind::Qemu) else {
        return;
    };
    let inst = Inst::new("x-shell", Behaviour::Serve(8090)).health(Health::Http(8090));
    lab.add(&inst);
    lab.ensure_started();
    ready(&lab, "x-shell");
    let (mut pty, mut cli) =
        Pty::spawn(exec_cmd(&lab, &["-it", "x-shell", "--", "/bin/sh"]), 30, 90);
    // The shell runs in the workload's root: the image's busybox is there.
    pty.send("echo \"in-$((6*7))-vm\"\r");
    let at = pty.expect("in-42-vm", 0, Duration::from_secs(60));
    pty.send("busybox stty size\r");
    let at = pty.expect("30 90", at, Duration::from_secs(30));
    // A resize of the CLI's terminal reaches the command's terminal.
    pty.resize(40, 100);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut from = at;
    loop {
        pty.send("busybox stty size\r");
        let t = pty.text();
        if t[from..].contains("40 100") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resize never reached the guest terminal:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(500));
        from = from.max(at);
    }
    pty.send("exit 7\r");
    let code = wait_exit(&mut cli.0, Duration::from_secs(30));
    assert_eq!(code, Some(7), "terminal shows:\n{}", pty.text());
    lab.remove("x-shell");
}

/// Standard input reaches the command with `-i` (and its end closes the command's
/// stdin), stdout and stderr stay apart without `-t`, a third concurrent session is
/// refused with a clear message, and an instance that is not ready is refused.
#[test]
fn exec_streams_and_limits_sessions_and_readiness() {
    let Some(lab) = Lab::shared(Kind::Qemu) else {
        return;
    };
    let a = Inst::new("x-limit", Behaviour::Serve(8091)).health(Health::Http(8091));
    let done = Inst::new("x-done", Behaviour::Exit(0));
    lab.add(&a);
    lab.add(&done);
    lab.ensure_started();
    ready(&lab, "x-limit");

    let mut cat = exec_cmd(
        &lab,
        &[
            "-i",
            "x-limit",
            "--",
            "/bin/sh",
            "-c",
            "cat; echo to-stderr >&2; exit 3",
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    cat.stdin
        .take()
        .unwrap()
        .write_all(b"line one\nline two\n")
        .unwrap();
    let out = cat.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(stdout, "line one\nline two\n", "stderr: {stderr}");
    assert_eq!(stderr, "to-stderr\n");
    assert_eq!(out.status.code(), Some(3));

    let sleeper = || {
        Reaped(
            exec_cmd(&lab, &["x-limit", "--", "sleep", "120"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let s1 = sleeper();
    let s2 = sleeper();
    wait_metric(
        &lab,
        "plfm_exec_sessions_active",
        2.0,
        Duration::from_secs(60),
    );
    let third = exec_cmd(&lab, &["x-limit", "--", "echo", "hi"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&third.stderr);
    assert_eq!(third.status.code(), Some(125), "{err}");
    assert!(err.contains("at most 2"), "{err}");
    // Clients that go away end their sessions (the guest hangs the command up).
    drop((s1, s2));
    wait_metric(
        &lab,
        "plfm_exec_sessions_active",
        0.0,
        Duration::from_secs(60),
    );

    lab.wait("x-done", "stopped", lab.kind.boot_within(), |v| {
        v.status == Status::Stopped
    });
    let refused = exec_cmd(&lab, &["x-done", "--", "echo", "hi"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(125), "{err}");
    assert!(err.contains("x-done is stopped, not ready"), "{err}");
    let unknown = exec_cmd(&lab, &["x-nobody", "--", "echo"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("x-nobody is not known"), "{err}");
    lab.remove("x-limit");
    lab.remove("x-done");
}

fn init_frame(id: &str, command: &[&str]) -> Frame {
    Frame::json(
        kind::INIT,
        &ExecInit {
            session_id: "gw-1".into(),
            instance_id: id.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            tty: false,
            cols: 0,
            rows: 0,
            env: [("GREETING".to_string(), "hej".to_string())].into(),
            stdin: false,
        },
    )
}

/// Reads frames until the exit frame: (stdout, stderr, exit).
fn collect<R: Read>(r: &mut R) -> (String, String, Option<ExecExit>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match read_frame(r) {
            Ok(Some(f)) => match f.kind {
                kind::STDOUT => out.extend_from_slice(&f.payload),
                kind::STDERR => err.extend_from_slice(&f.payload),
                kind::EXIT => {
                    return (
                        String::from_utf8_lossy(&out).into(),
                        String::from_utf8_lossy(&err).into(),
                        Some(f.parse().unwrap()),
                    )
                }
                other => panic!("unexpected frame 0x{other:02x}"),
            },
            _ => {
                return (
                    String::from_utf8_lossy(&out).into(),
                    String::from_utf8_lossy(&err).into(),
                    None,
                )
            }
        }
    }
}

/// The platform's exec gateway connects over TCP and speaks the length-prefixed
/// frames: a command runs in a real VM with the init's env, its stdout and stderr come
/// back as 0x02/0x03 and its exit code in 0x11. Plaintext from an address outside
/// `allow_plaintext_from` gets nothing.
#[test]
fn the_gateway_framing_runs_a_command_in_a_real_vm() {
    let Some(lab) = Lab::shared(Kind::Qemu) else {
        return;
    };
    let inst = Inst::new("x-gw", Behaviour::Serve(8092)).health(Health::Http(8092));
    lab.add(&inst);
    lab.ensure_started();
    ready(&lab, "x-gw");
    let addr = format!("127.0.0.1:{}", lab.exec_port);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write_frame(
        &mut s,
        &init_frame("x-gw", &["/bin/sh", "-c", "echo \"$GREETING from $(cat /proc/sys/kernel/hostname 2>/dev/null || echo vm)\"; echo oops >&2; exit 5"]),
    )
    .unwrap();
    let (out, err, exit) = collect(&mut s);
    let exit = exit.expect("an exit frame");
    assert!(out.starts_with("hej from "), "stdout {out:?}");
    assert_eq!(err, "oops\n");
    assert_eq!(exit.exit_code, Some(5), "{exit:?}");
    assert_eq!(exit.reason.as_str(), "exited");

    // 127.0.0.2 is this namespace's loopback too, but not an allowed gateway.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let s = sock.connect(addr.parse().unwrap()).await.unwrap();
        s.into_std().unwrap()
    });
    refused.set_nonblocking(false).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut refused = refused;
    let _ = write_frame(&mut refused, &init_frame("x-gw", &["echo", "pwned"]));
    let (out, _, exit) = collect(&mut refused);
    assert!(
        exit.is_none() && out.is_empty(),
        "a plaintext peer outside the allow list got {out:?} {exit:?}"
    );
    wait_log(&lab, "plaintext from 127.0.0.2 refused");
    lab.remove("x-gw");
}

struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
}

/// A CA with this node's certificate (`node.pem`/`node.key`, for 127.0.0.1) and client
/// certificates for the given common names (`<cn>.pem`/`<cn>.key`).
fn pki(clients: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "plfm exec test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let node_key = KeyPair::generate().unwrap();
    let mut np = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    np.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let node = np.signed_by(&node_key, &issuer).unwrap();
    std::fs::write(dir.path().join("node.pem"), node.pem()).unwrap();
    std::fs::write(dir.path().join("node.key"), node_key.serialize_pem()).unwrap();
    for cn in clients {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, *cn);
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join(format!("{cn}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{cn}.key")), key.serialize_pem()).unwrap();
    }
    Pki { dir, ca }
}

/// Opens a TLS session to the gateway with `client` (a certificate of `pki`, or none),
/// sends an init frame for `id` and collects the answer frames.
async fn tls_session(
    addr: &str,
    server_ca: &Pki,
    client: Option<(&Pki, &str)>,
    id: &str,
) -> (String, String, Option<ExecExit>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.ca.der().clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((p, cn)) => {
            let chain = vec![
                CertificateDer::from_pem_file(p.dir.path().join(format!("{cn}.pem"))).unwrap(),
            ];
            let key = PrivateKeyDer::from_pem_file(p.dir.path().join(format!("{cn}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = match connector.connect(name, tcp).await {
        Ok(t) => t,
        Err(_) => return (String::new(), String::new(), None),
    };
    if tls
        .write_all(&init_frame(id, &["echo", "hi"]).encode())
        .await
        .is_err()
    {
        return (String::new(), String::new(), None);
    }
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut bytes)).await;
    collect(&mut &bytes[..])
}

/// With mTLS configured, a gateway certificate of the configured CA naming an allowed
/// subject opens a session (here the mock runtime then refuses it for having no guest,
/// which shows the session got past authentication); a certificate with another
/// subject, one of another CA, and no certificate get nothing.
#[test]
fn the_gateway_needs_a_certificate_of_its_ca_with_an_allowed_subject() {
    let Some(lab) = Lab::own(Kind::Mock) else {
        return;
    };
    let good = pki(&["plfm-exec-gateway", "someone-else"]);
    let other = pki(&["plfm-exec-gateway"]);
    let f = |n: &str| good.dir.path().join(n).display().to_string();
    lab.exec_config(&format!(
        "[exec]\nlisten = \"127.0.0.1:{{port}}\"\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\nallowed_subjects = [\"plfm-exec-gateway\"]",
        f("ca.pem"),
        f("node.pem"),
        f("node.key")
    ));
    lab.add(&Inst::new("x-tls", Behaviour::Idle));
    lab.start(&[]);
    ready(&lab, "x-tls");
    let addr = format!("127.0.0.1:{}", lab.exec_port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_, _, exit) = rt.block_on(tls_session(
        &addr,
        &good,
        Some((&good, "plfm-exec-gateway")),
        "x-tls",
    ));
    let exit = exit.expect("an allowed gateway gets an answer");
    assert_eq!(exit.reason.as_str(), "refused");
    assert!(
        exit.message
            .as_deref()
            .unwrap_or("")
            .contains("mock runtime offers no exec"),
        "{exit:?}"
    );
    for (what, client) in [
        ("another subject", Some((&good, "someone-else"))),
        ("another CA", Some((&other, "plfm-exec-gateway"))),
        ("no certificate", None),
    ] {
        let (out, _, exit) = rt.block_on(tls_session(&addr, &good, client, "x-tls"));
        assert!(exit.is_none() && out.is_empty(), "{what}: got {exit:?}");
    }
    wait_log(&lab, "none of exec.allowed_subjects");
    // Plaintext is not accepted from anywhere when no address is allowed.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = write_frame(&mut s, &init_frame("x-tls", &["echo", "hi"]));
    let (_, _, exit) = collect(&mut s);
    assert!(exit.is_none(), "plaintext got {exit:?}");
}
