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
//! Under `run`, the guest also plays the workload the handshake config names when its
//! `argv[0]` is one of these verbs (any other argv idles until stopped, as before):
//!
//! - `["exit", "<code>"]`: the workload exits with `code` right after its start.
//! - `["kill", "<signal>"]`: the workload is killed by `signal`.
//! - `["oom"]`: the guest kernel OOM-kills the workload (reported as the guest init
//!   does: killed by signal 9, `oom_killed`).
//! - `["serve", "<port>"]`: the workload answers HTTP 200 on `<port>` of the guest's
//!   IPv4 link address from the config (added to `lo`, as the guest would own it on its
//!   eth0; 127.0.0.1 when the config has none), for host health checks (HTTP or TCP).
//! - `["ignore-term"]` or `["ignore-term", "<port>"]`: the workload ignores SIGTERM: on
//!   a stop request the guest waits the whole `deadline_ms`, reports it killed by signal
//!   9 and ends (as the real guest init kills what is left at the deadline and reboots).
//!   With a port it also answers HTTP there, as `serve` does.
//! - `["user-check", "<uid>", "<gid>"]`: the workload exits 42 when the config's
//!   `workload.uid`/`gid` are these, else 43.
//!
//! A workload that ends ends the VM (the stand-in exits 0, as Firecracker does when its
//! guest reboots). Every config received is recorded as
//! `EVENT guest_config <unix ms> <instance id> uid=<uid> gid=<gid> secrets_replacement_char=<bool>`.
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
/// `--start-time-cpu-us`, `--parent-cpu-time-us`, then everything after `--`); with
/// `--new-pid-ns` it spawns it instead, writes its pid file and exits.
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
    let mut cmd = std::process::Command::new(&exec);
    cmd.args(["--id", &id, "--start-time-us", "1", "--start-time-cpu-us", "1", "--parent-cpu-time-us", "1"])
        .args(&a.rest)
        .env_remove("FAKE_FC_ROLE")
        .env("FAKE_FC_JAIL", &root);
    if a.values.contains_key("new-pid-ns") {
        // As the real jailer: start the exec file as a child (here without a new pid
        // namespace), write its pid to `<root>/<exec file name>.pid` and exit.
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| fail(format!("Failed to exec into Firecracker: {e}")));
        if let Err(e) = std::fs::write(format!("{root}/{name}.pid"), child.id().to_string()) {
            fail(format!("Failed to write the pid file: {e}"));
        }
        std::process::exit(0)
    }
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
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

/// A JSON value (just enough to read the handshake config; std only).
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn get(&self, k: &str) -> Option<&J> {
        match self {
            J::Obj(v) => v.iter().find(|(n, _)| n == k).map(|(_, j)| j),
            _ => None,
        }
    }
    fn str(&self) -> Option<&str> {
        match self {
            J::Str(s) => Some(s),
            _ => None,
        }
    }
    fn num(&self) -> Option<f64> {
        match self {
            J::Num(n) => Some(*n),
            _ => None,
        }
    }
}

fn parse_json(text: &str) -> Option<J> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let v = parse_value(&chars, &mut i)?;
    Some(v)
}

fn skip_ws(c: &[char], i: &mut usize) {
    while *i < c.len() && c[*i].is_whitespace() {
        *i += 1;
    }
}

fn parse_value(c: &[char], i: &mut usize) -> Option<J> {
    skip_ws(c, i);
    match *c.get(*i)? {
        '{' => {
            *i += 1;
            let mut out = Vec::new();
            loop {
                skip_ws(c, i);
                if *c.get(*i)? == '}' {
                    *i += 1;
                    return Some(J::Obj(out));
                }
                let k = match parse_value(c, i)? {
                    J::Str(s) => s,
                    _ => return None,
                };
                skip_ws(c, i);
                if *c.get(*i)? != ':' {
                    return None;
                }
                *i += 1;
                let v = parse_value(c, i)?;
                out.push((k, v));
                skip_ws(c, i);
                if *c.get(*i)? == ',' {
                    *i += 1;
                }
            }
        }
        '[' => {
            *i += 1;
            let mut out = Vec::new();
            loop {
                skip_ws(c, i);
                if *c.get(*i)? == ']' {
                    *i += 1;
                    return Some(J::Arr(out));
                }
                out.push(parse_value(c, i)?);
                skip_ws(c, i);
                if *c.get(*i)? == ',' {
                    *i += 1;
                }
            }
        }
        '"' => {
            *i += 1;
            let mut s = String::new();
            loop {
                let ch = *c.get(*i)?;
                *i += 1;
                match ch {
                    '"' => return Some(J::Str(s)),
                    '\\' => {
                        let e = *c.get(*i)?;
                        *i += 1;
                        match e {
                            'n' => s.push('\n'),
                            't' => s.push('\t'),
                            'r' => s.push('\r'),
                            'b' => s.push('\u{8}'),
                            'f' => s.push('\u{c}'),
                            'u' => {
                                let hex: String = c.get(*i..*i + 4)?.iter().collect();
                                *i += 4;
                                let mut code = u32::from_str_radix(&hex, 16).ok()?;
                                if (0xD800..0xDC00).contains(&code) && c.get(*i) == Some(&'\\') {
                                    let lo: String = c.get(*i + 2..*i + 6)?.iter().collect();
                                    let lo = u32::from_str_radix(&lo, 16).ok()?;
                                    *i += 6;
                                    code = 0x10000 + ((code - 0xD800) << 10) + (lo - 0xDC00);
                                }
                                s.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
                            }
                            other => s.push(other),
                        }
                    }
                    other => s.push(other),
                }
            }
        }
        't' => {
            *i += 4;
            Some(J::Bool(true))
        }
        'f' => {
            *i += 5;
            Some(J::Bool(false))
        }
        'n' => {
            *i += 4;
            Some(J::Null)
        }
        _ => {
            let start = *i;
            while *i < c.len() && (c[*i].is_ascii_digit() || "+-.eE".contains(c[*i])) {
                *i += 1;
            }
            let n: String = c[start..*i].iter().collect();
            n.parse().ok().map(J::Num)
        }
    }
}

/// What the workload named in the config does (see the module doc).
#[derive(Debug, Clone, PartialEq)]
enum Workload {
    Idle,
    Exit(i32),
    Kill(i32),
    Oom,
    Serve(u16),
    IgnoreTerm(Option<u16>),
    UserCheck(i32),
}

fn workload_of(config: &J) -> (Workload, Option<String>) {
    let w = config.get("workload");
    let argv: Vec<String> = match w.and_then(|w| w.get("argv")) {
        Some(J::Arr(a)) => a.iter().filter_map(|v| v.str().map(str::to_string)).collect(),
        _ => vec![],
    };
    let num = |i: usize| argv.get(i).and_then(|a| a.parse::<i64>().ok());
    let ipv4 = config
        .get("network")
        .and_then(|n| n.get("ipv4"))
        .and_then(|n| n.get("address"))
        .and_then(J::str)
        .map(str::to_string);
    let id_of = |k: &str| w.and_then(|w| w.get(k)).and_then(J::num).map(|n| n as i64);
    let wl = match argv.first().map(String::as_str) {
        Some("exit") => Workload::Exit(num(1).unwrap_or(0) as i32),
        Some("kill") => Workload::Kill(num(1).unwrap_or(9) as i32),
        Some("oom") => Workload::Oom,
        Some("serve") => Workload::Serve(num(1).unwrap_or(8080) as u16),
        Some("ignore-term") => Workload::IgnoreTerm(num(1).map(|p| p as u16)),
        Some("user-check") => {
            let ok = id_of("uid") == num(1) && id_of("gid") == num(2);
            Workload::UserCheck(if ok { 42 } else { 43 })
        }
        _ => Workload::Idle,
    };
    (wl, ipv4)
}

/// Serves HTTP 200 to every connection on `port` of `ipv4` (added to `lo`).
fn serve_workload(port: u16, ipv4: Option<String>) {
    let addr = match ipv4 {
        Some(a) => {
            let _ = std::process::Command::new("ip")
                .args(["addr", "add", &format!("{a}/32"), "dev", "lo"])
                .stderr(std::process::Stdio::null())
                .status();
            a
        }
        None => "127.0.0.1".to_string(),
    };
    let listener = match std::net::TcpListener::bind((addr.as_str(), port)) {
        Ok(l) => l,
        Err(e) => {
            record(&format!("EVENT serve_failed {} {addr}:{port} {e}", now_ms()));
            return;
        }
    };
    event("serving");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                // Long enough for a client on a loaded machine to send its request:
                // answering before it did breaks its write (EPIPE).
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                );
            });
        }
    });
}

fn exited_line(code: Option<i32>, signal: Option<i32>, oom: bool) -> String {
    let n = |v: Option<i32>| v.map_or("null".to_string(), |v| v.to_string());
    format!(
        "{{\"type\":\"status\",\"event\":\"exited\",\"code\":{},\"signal\":{},\"oom_killed\":{oom}}}",
        n(code),
        n(signal)
    )
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
    let mut workload = Workload::Idle;
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
        // A resumed guest ignores the config it gets (its workload runs already).
        if !resumed {
            if let Some(config) = parse_json(line.trim()) {
                let (wl, ipv4) = workload_of(&config);
                let w = config.get("workload");
                let id_of = |k: &str| {
                    w.and_then(|w| w.get(k))
                        .and_then(J::num)
                        .map_or("none".to_string(), |n| (n as i64).to_string())
                };
                let replacement = config
                    .get("secrets")
                    .and_then(|s| s.get("data"))
                    .and_then(J::str)
                    .is_some_and(|d| d.contains('\u{FFFD}'));
                let instance = config.get("instance_id").and_then(J::str).unwrap_or("?");
                record(&format!(
                    "EVENT guest_config {} {instance} uid={} gid={} secrets_replacement_char={replacement}",
                    now_ms(),
                    id_of("uid"),
                    id_of("gid")
                ));
                if let Workload::Serve(port) | Workload::IgnoreTerm(Some(port)) = wl {
                    serve_workload(port, ipv4);
                }
                workload = wl;
            }
        }
        let _ = writeln!(w, "{{\"type\":\"ack\"}}");
        let _ = writeln!(
            w,
            "{{\"type\":\"status\",\"event\":\"workload_started\",\"pid\":7}}"
        );
        event(if resumed { "guest_resumed" } else { "guest_started" });
        let ended = match workload {
            Workload::Exit(code) | Workload::UserCheck(code) => Some(exited_line(Some(code), None, false)),
            Workload::Kill(sig) => Some(exited_line(None, Some(sig), false)),
            Workload::Oom => Some(exited_line(None, Some(9), true)),
            _ => None,
        };
        if let Some(l) = ended {
            event("workload_exited");
            let _ = writeln!(w, "{l}");
            let _ = w.flush();
            std::thread::sleep(Duration::from_millis(20));
            std::process::exit(0);
        }
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if line.contains("\"stop\"") {
                event("guest_stop");
                if let Workload::IgnoreTerm(_) = workload {
                    let deadline = parse_json(line.trim())
                        .and_then(|j| j.get("deadline_ms").and_then(J::num))
                        .unwrap_or(0.0) as u64;
                    std::thread::sleep(Duration::from_millis(deadline));
                    event("guest_killed_at_deadline");
                    let _ = writeln!(w, "{}", exited_line(None, Some(9), false));
                    std::thread::sleep(Duration::from_millis(20));
                    std::process::exit(0);
                }
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
