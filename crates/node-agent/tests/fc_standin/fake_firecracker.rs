//! TEST DOUBLE: a stand-in for the `firecracker` binary, compiled by the tests with
//! `rustc` (std only). It is not Firecracker and boots nothing.
//!
//! It takes `--api-sock <path> --id <id>`, serves a minimal HTTP/1.1 API on the socket
//! (204 for PUT, `InstanceInfo` for `GET /`), appends every request as
//! `METHOD PATH BODY` to `$FAKE_FC_RECORD`, and plays a guest over the hybrid vsock
//! (`<uds_path>_5161`) after `InstanceStart`. `$FAKE_FC` is a comma-separated list:
//!
//! - `no_socket`: never create the API socket (sleep).
//! - `exit_now:<code>`: print a log line on stderr and exit with `code` at once.
//! - `exit_after_start:<code>`: accept the configuration and `InstanceStart`, write log
//!   lines to the logger file, exit with `code` before any guest handshake.
//! - `reject:<path>`: answer 400 with a `fault_message` to a PUT on `path`.
//! - `run`: after `InstanceStart`, act as guest: hello → config → ack →
//!   workload_started; reconnect with `resumed` when the host goes away.
//! - `ignore_stop`: ignore the guest stop request (default: report exited 0 and exit 0).
//! - `ignore_cad`: ignore SendCtrlAltDel (default: exit 0).
//!
//! Events are recorded as `EVENT <name> <unix ms>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn record(line: &str) {
    if let Ok(path) = std::env::var("FAKE_FC_RECORD") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

fn event(name: &str) {
    record(&format!("EVENT {name} {}", now_ms()));
}

/// The string value of `"key":"…"` in a flat JSON text (no escapes needed here).
fn json_str(body: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = body.find(&pat)? + pat.len();
    let end = body[start..].find('"')? + start;
    Some(body[start..end].to_string())
}

struct State {
    modes: Vec<String>,
    id: String,
    jail: Option<String>,
    log_path: Option<String>,
    uds: Option<String>,
}

impl State {
    fn has(&self, m: &str) -> bool {
        self.modes.iter().any(|x| x == m)
    }
    fn value(&self, m: &str) -> Option<String> {
        self.modes
            .iter()
            .find_map(|x| x.strip_prefix(&format!("{m}:")).map(str::to_string))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let sock = arg("--api-sock").unwrap_or_else(|| {
        eprintln!("fake-firecracker: --api-sock is required");
        std::process::exit(153)
    });
    let id = arg("--id").unwrap_or_default();
    // Invoked as the jailer: the API socket and the paths given over the API are
    // relative to `<chroot-base-dir>/<exec-file name>/<id>/root` (no real chroot).
    let jail = arg("--chroot-base-dir").map(|base| {
        let exec = arg("--exec-file").unwrap_or_default();
        let name = std::path::Path::new(&exec)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        format!("{base}/{name}/{id}/root")
    });
    if let Some(root) = &jail {
        record(&format!("EVENT jailed {} {root}", now_ms()));
    }
    let sock = match &jail {
        Some(root) => format!("{root}{sock}"),
        None => sock,
    };
    let modes: Vec<String> = std::env::var("FAKE_FC")
        .unwrap_or_default()
        .split(',')
        .map(str::to_string)
        .collect();
    let state = Arc::new(Mutex::new(State {
        modes,
        id,
        jail,
        log_path: None,
        uds: None,
    }));
    record(&format!("EVENT spawned {} {}", now_ms(), std::process::id()));
    {
        let s = state.lock().unwrap();
        if s.has("no_socket") {
            drop(s);
            std::thread::sleep(Duration::from_secs(600));
            return;
        }
        if let Some(code) = s.value("exit_now") {
            eprintln!("fake-firecracker: simulated failure before the API (exit {code})");
            std::process::exit(code.parse().unwrap_or(1));
        }
    }
    let listener = UnixListener::bind(&sock).unwrap_or_else(|e| {
        eprintln!("fake-firecracker: bind {sock}: {e}");
        std::process::exit(1)
    });
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        serve(conn, &state);
    }
}

fn serve(mut conn: UnixStream, state: &Arc<Mutex<State>>) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    let _ = reader.read_exact(&mut body);
    let body = String::from_utf8_lossy(&body).to_string();
    record(&format!("{method} {path} {body}"));
    let respond = |conn: &mut UnixStream, status: &str, json: &str| {
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
            json.len()
        );
        let _ = conn.flush();
    };
    let mut s = state.lock().unwrap();
    if method == "PUT" && s.value("reject").as_deref() == Some(path.as_str()) {
        respond(
            &mut conn,
            "400 Bad Request",
            &format!("{{\"fault_message\":\"fake: {path} refused: Invalid argument (os error 22)\"}}"),
        );
        return;
    }
    match (method.as_str(), path.as_str()) {
        ("GET", "/") => {
            let info = format!(
                "{{\"id\":\"{}\",\"state\":\"Running\",\"vmm_version\":\"1.16.1\",\"app_name\":\"Firecracker\"}}",
                s.id
            );
            respond(&mut conn, "200 OK", &info);
        }
        ("GET", "/machine-config") => {
            respond(&mut conn, "200 OK", "{\"vcpu_count\":1,\"mem_size_mib\":128}");
        }
        ("PUT", "/logger") => {
            let jail = s.jail.clone().unwrap_or_default();
            s.log_path = json_str(&body, "log_path").map(|p| format!("{jail}{p}"));
            respond(&mut conn, "204 No Content", "");
        }
        ("PUT", "/vsock") => {
            let jail = s.jail.clone().unwrap_or_default();
            s.uds = json_str(&body, "uds_path").map(|p| format!("{jail}{p}"));
            respond(&mut conn, "204 No Content", "");
        }
        ("PUT", "/actions") if body.contains("InstanceStart") => {
            respond(&mut conn, "204 No Content", "");
            if let Some(code) = s.value("exit_after_start") {
                if let Some(p) = &s.log_path {
                    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(p) {
                        let _ = writeln!(f, "[fake-firecracker] Running");
                        let _ = writeln!(f, "[fake-firecracker] simulated crash, exit {code}");
                    }
                }
                std::process::exit(code.parse().unwrap_or(1));
            }
            if s.has("run") {
                let st = state.clone();
                std::thread::spawn(move || guest(st));
            }
        }
        ("PUT", "/actions") if body.contains("SendCtrlAltDel") => {
            event("ctrl_alt_del");
            respond(&mut conn, "204 No Content", "");
            if !s.has("ignore_cad") {
                std::process::exit(0);
            }
        }
        _ => respond(&mut conn, "204 No Content", ""),
    }
}

/// Plays the guest side of the handshake, reconnecting as `resumed` when the host
/// side goes away (agent restart).
fn guest(state: Arc<Mutex<State>>) {
    let (uds, id, ignore_stop) = {
        let s = state.lock().unwrap();
        (s.uds.clone().unwrap_or_default(), s.id.clone(), s.has("ignore_stop"))
    };
    let path = format!("{uds}_5161");
    let mut resumed = false;
    loop {
        let Ok(conn) = UnixStream::connect(&path) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let mut w = conn.try_clone().expect("clone");
        let mut r = BufReader::new(conn);
        let resumed_field = if resumed { ",\"resumed\":true" } else { "" };
        let _ = writeln!(
            w,
            "{{\"type\":\"hello\",\"guest_init_version\":\"fake\",\"protocol\":1,\"instance_id\":\"{id}\",\"boot_id\":\"b\"{resumed_field}}}"
        );
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let _ = writeln!(w, "{{\"type\":\"ack\"}}");
        let _ = writeln!(
            w,
            "{{\"type\":\"status\",\"event\":\"workload_started\",\"pid\":7}}"
        );
        event(if resumed { "guest_resumed" } else { "guest_started" });
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if line.contains("\"stop\"") {
                event("guest_stop");
                if !ignore_stop {
                    let _ = writeln!(
                        w,
                        "{{\"type\":\"status\",\"event\":\"exited\",\"code\":0,\"signal\":null,\"oom_killed\":false}}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                    std::process::exit(0);
                }
            }
        }
        resumed = true;
    }
}
