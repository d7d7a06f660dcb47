//! TEST DOUBLE: a stand-in for the `firecracker` binary, compiled by the tests with
//! `rustc` (std only). It is not Firecracker and boots nothing.
//!
//! It parses its command line as Firecracker v1.16.1 does (an unknown or repeated
//! argument exits 153) and, run with `FAKE_FC_ROLE=jailer`, acts as the jailer (its
//! arguments checked as strictly, then an exec of the stand-in with the arguments the
//! real jailer adds). As `firecracker` it takes `--api-sock <path> --id <id>`, serves a minimal HTTP/1.1 API on the socket
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

/// Parsed command line: each option's values, and what follows `--`.
struct Args {
    values: std::collections::HashMap<String, Vec<String>>,
    rest: Vec<String>,
}

impl Args {
    fn one(&self, name: &str) -> Option<String> {
        self.values.get(name).and_then(|v| v.first()).cloned()
    }
    fn all(&self, name: &str) -> Vec<String> {
        self.values.get(name).cloned().unwrap_or_default()
    }
}

/// Parses `--name value`, `--name=value` and flags the way Firecracker's and the
/// jailer's own argument parser does: an unknown argument or a single-valued argument
/// given twice is an error (Firecracker then exits 153, the jailer 1). `rest_ok`: `--`
/// ends the options (jailer only).
fn parse_args(
    argv: &[String],
    valued: &[&str],
    flags: &[&str],
    multi: &[&str],
    rest_ok: bool,
) -> Result<Args, String> {
    let mut values: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        if a == "--" && rest_ok {
            return Ok(Args {
                values,
                rest: argv[i + 1..].to_vec(),
            });
        }
        let Some(body) = a.strip_prefix("--") else {
            return Err(format!("Found argument '{a}' which wasn't expected, or isn't valid in this context."));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (body.to_string(), None),
        };
        let value = if flags.contains(&name.as_str()) {
            String::new()
        } else if valued.contains(&name.as_str()) || multi.contains(&name.as_str()) {
            match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    argv.get(i).cloned().ok_or_else(|| format!("The argument '{name}' requires a value but none was supplied"))?
                }
            }
        } else {
            return Err(format!("Found argument '{name}' which wasn't expected, or isn't valid in this context."));
        };
        let e = values.entry(name.clone()).or_default();
        if !e.is_empty() && !multi.contains(&name.as_str()) {
            return Err(format!("The argument '{name}' was provided more than once."));
        }
        e.push(value);
        i += 1;
    }
    Ok(Args {
        values,
        rest: vec![],
    })
}

/// Firecracker v1.16.1's options (`firecracker --help`).
const FC_VALUED: &[&str] = &[
    "api-sock", "config-file", "describe-snapshot", "http-api-max-payload-size", "id",
    "level", "log-path", "metadata", "metrics-path", "mmds-size-limit", "module",
    "parent-cpu-time-us", "seccomp-filter", "start-time-cpu-us", "start-time-us",
];
const FC_FLAGS: &[&str] = &[
    "boot-timer", "enable-pci", "help", "no-api", "no-seccomp", "show-level",
    "show-log-origin", "snapshot-version", "version",
];

/// Acts as the jailer v1.16.1 (without the chroot, uid switch or cgroups): checks its
/// arguments as strictly as the real one, creates `<base>/<exec file name>/<id>/root`
/// and execs the exec file with what the real jailer passes (`--id`, `--start-time-us`,
/// `--start-time-cpu-us`, `--parent-cpu-time-us`, then everything after `--`).
fn jailer(argv: &[String]) -> ! {
    let fail = |msg: String| -> ! {
        eprintln!("{msg}");
        std::process::exit(1)
    };
    let a = parse_args(
        argv,
        &["chroot-base-dir", "cgroup-version", "exec-file", "gid", "id", "netns", "parent-cgroup", "uid"],
        &["daemonize", "help", "new-pid-ns", "version"],
        &["cgroup", "resource-limit"],
        true,
    )
    .unwrap_or_else(|e| fail(format!("Failed to parse arguments: {e}")));
    let need = |n: &str| {
        a.one(n)
            .unwrap_or_else(|| fail(format!("Failed to parse arguments: Missing mandatory argument '{n}'")))
    };
    let id = need("id");
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        fail(format!("Invalid instance ID: {id}"));
    }
    let exec = need("exec-file");
    for n in ["uid", "gid"] {
        if need(n).parse::<u32>().is_err() {
            fail(format!("Invalid {n} value"));
        }
    }
    if !std::path::Path::new(&exec).is_file() {
        fail(format!("Failed to canonicalize path {exec}: No such file or directory (os error 2)"));
    }
    let version = a.one("cgroup-version").unwrap_or_else(|| "1".into());
    // Files of the other cgroup version name controllers the jailer cannot find there.
    let (v1_only, v2_only) = (
        ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "cpu.shares"],
        ["memory.max", "memory.swap.max", "cpu.weight", "cpu.max"],
    );
    for c in a.all("cgroup") {
        let Some((file, value)) = c.split_once('=') else {
            fail(format!("Invalid cgroup {c}"));
        };
        let controller = file.split('.').next().unwrap_or("");
        let wrong = match version.as_str() {
            "1" => v2_only.contains(&file),
            "2" => v1_only.contains(&file),
            v => fail(format!("Invalid cgroup version {v}")),
        };
        if wrong || value.is_empty() {
            fail(format!("Controller {controller} is unavailable"));
        }
        record(&format!("EVENT jailer_cgroup {} v{version} {c}", now_ms()));
    }
    let base = a.one("chroot-base-dir").unwrap_or_else(|| "/srv/jailer".into());
    if !std::path::Path::new(&base).is_dir() {
        fail(format!("Failed to canonicalize path {base}: No such file or directory (os error 2)"));
    }
    let name = std::path::Path::new(&exec)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let root = format!("{base}/{name}/{id}/root");
    if let Err(e) = std::fs::create_dir_all(&root) {
        fail(format!("Failed to create {root}: {e}"));
    }
    record(&format!("EVENT jailed {} {root}", now_ms()));
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&exec)
        .args(["--id", &id, "--start-time-us", "1", "--start-time-cpu-us", "1", "--parent-cpu-time-us", "1"])
        .args(&a.rest)
        .env_remove("FAKE_FC_ROLE")
        .env("FAKE_FC_JAIL", &root)
        .exec();
    fail(format!("Failed to exec into Firecracker: {err}"))
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var("FAKE_FC_ROLE").as_deref() == Ok("jailer") {
        jailer(&argv);
    }
    let args = parse_args(&argv, FC_VALUED, FC_FLAGS, &[], false).unwrap_or_else(|e| {
        eprintln!("[fake-firecracker] Arguments parsing error: {e}");
        eprintln!("[fake-firecracker] Firecracker exiting with error. exit_code=153");
        std::process::exit(153)
    });
    let sock = args.one("api-sock").unwrap_or_else(|| "/run/firecracker.socket".into());
    let id = args.one("id").unwrap_or_else(|| "anonymous-instance".into());
    // Started by the jailer: the API socket and the paths given over the API are
    // relative to the jail's root (no real chroot).
    let jail = std::env::var("FAKE_FC_JAIL").ok();
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
