//! Support for the image pipeline's system tests: a real `docker-registry` on
//! 127.0.0.1 (free port, temp storage, killed on drop), pushing test images built
//! in memory, and reading built disks with `debugfs` (no mount).
//!
//! Prerequisites are checked by [`prerequisites`]: a missing tool skips the test
//! with a message, or fails it when `PLFM_REQUIRE_SYSTEM_TESTS=1` (the gate of
//! `common::gate`, which every crate including this module includes too).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use crate::common::wait::wait_until as wait_for;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use plfm_node_agent::image::{Digest, ImageConfig, ImageRef};

pub const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// True when every tool the image system tests need is present. Otherwise prints
/// why the test is skipped, or panics when `PLFM_REQUIRE_SYSTEM_TESTS=1`.
pub fn prerequisites(test: &str) -> bool {
    let mut missing = Vec::new();
    for (tool, pkg) in [
        ("docker-registry", "docker-registry"),
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("dumpe2fs", "e2fsprogs"),
    ] {
        if which(tool).is_none() {
            missing.push(format!("{tool} (Debian package {pkg})"));
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        missing.push("/bin/busybox (Debian package busybox-static)".into());
    }
    if rustix::process::geteuid().as_raw() != 0 {
        missing.push("root (to set file owners while unpacking)".into());
    }
    if missing.is_empty() {
        return true;
    }
    crate::common::gate::skip_or_fail(&format!("{test}: {}", missing.join(", ")));
    false
}

/// A `docker-registry` serving from a temp directory on 127.0.0.1.
pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
    /// Basic credentials the registry requires (None: anonymous).
    pub basic: Option<(String, String)>,
}

/// User and password of the registry started by [`Registry::start_with_basic_auth`].
pub const TEST_USER: &str = "plfm";
pub const TEST_PASSWORD: &str = "plfm-test-pw";
/// bcrypt (cost 4) of TEST_PASSWORD, for docker-registry's htpasswd file.
const TEST_HTPASSWD: &str = "plfm:$2a$04$X/trwt1uHOY.yO3wVAtGFuIPgHiScpWTUS1uj907w.qMrHOgnFJj6\n";

impl Registry {
    pub fn start() -> Registry {
        Self::start_with(false)
    }

    /// A registry that requires HTTP basic authentication (htpasswd).
    pub fn start_with_basic_auth() -> Registry {
        Self::start_with(true)
    }

    fn start_with(basic: bool) -> Registry {
        if std::env::var_os("PLFM_TEST_TRACE").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("oci_client=debug")
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = format!("127.0.0.1:{}", crate::common::free_port());
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n{auth}",
                dir.path().join("storage").display(),
                auth = if basic {
                    format!(
                        "auth:\n  htpasswd:\n    realm: plfm-test\n    path: {}\n",
                        dir.path().join("htpasswd").display()
                    )
                } else {
                    String::new()
                }
            ),
        )
        .expect("write registry config");
        std::fs::write(dir.path().join("htpasswd"), TEST_HTPASSWD).expect("write htpasswd");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let child = Command::new(which("docker-registry").expect("docker-registry"))
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let reg = Registry {
            child,
            dir,
            addr,
            basic: basic.then(|| (TEST_USER.to_string(), TEST_PASSWORD.to_string())),
        };
        let ready = if basic { 401 } else { 200 };
        wait_for(
            "docker-registry to answer /v2/",
            Duration::from_secs(15),
            || reg.http_status("GET", "/v2/") == Some(ready),
        );
        reg
    }

    /// Status of a plain HTTP request, or None when not reachable.
    pub fn http_status(&self, method: &str, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "{method} {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).ok()?;
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many `GET /v2/…` requests whose path contains `fragment` the registry
    /// served (from its access log), e.g. `/manifests/sha256:…` or `/blobs/sha256:…`.
    pub fn gets(&self, fragment: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(fragment))
            .count()
    }

    /// The stored bytes of a blob (to tamper with).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Agent-side config for this registry (plain HTTP on loopback).
    pub fn image_config(&self) -> ImageConfig {
        ImageConfig::default()
    }

    fn client(&self) -> Client {
        plfm_node_agent::control_plane::http::ensure_crypto_provider();
        Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        })
    }

    /// Pushes an image from layer blobs (with media types) and a config document;
    /// returns the reference to pull.
    pub async fn push(&self, repo: &str, layers: &[(Vec<u8>, &str)], config: &[u8]) -> ImageRef {
        self.push_with(repo, layers, config, |m| m).await
    }

    /// Like [`push`], letting the test edit the manifest JSON before it is pushed.
    pub async fn push_with(
        &self,
        repo: &str,
        layers: &[(Vec<u8>, &str)],
        config: &[u8],
        edit: impl FnOnce(serde_json::Value) -> serde_json::Value,
    ) -> ImageRef {
        let client = self.client();
        let reference = Reference::with_tag(self.addr.clone(), repo.to_string(), "latest".into());
        let auth = match &self.basic {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        client
            .auth(&reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .ok();
        let mut descs = Vec::new();
        for (blob, mt) in layers {
            let d = Digest::of(blob).to_string();
            client
                .push_blob(&reference, blob.clone(), &d)
                .await
                .expect("push layer");
            descs.push(serde_json::json!({"mediaType": mt, "digest": d, "size": blob.len()}));
        }
        let cd = Digest::of(config).to_string();
        client
            .push_blob(&reference, config.to_vec(), &cd)
            .await
            .expect("push config");
        let manifest = edit(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": descs,
        }));
        let body = serde_json::to_vec(&manifest).expect("manifest json");
        let digest = Digest::of(&body);
        let mt = manifest["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_string();
        let by_digest =
            Reference::with_digest(self.addr.clone(), repo.to_string(), digest.to_string());
        client
            .push_manifest_raw(
                &by_digest,
                body,
                reqwest::header::HeaderValue::from_str(&mt).expect("header"),
            )
            .await
            .expect("push manifest");
        ImageRef::parse_pinned(&format!("{}/{repo}@{digest}", self.addr)).expect("reference")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An image config document with process defaults and diff ids omitted.
pub fn config_json(entrypoint: &[&str], cmd: &[&str], env: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": env, "WorkingDir": "/srv", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .expect("config json")
}

/// `debugfs -R <request> <disk>` stdout.
pub fn debugfs(disk: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(disk)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Dumps the whole disk into a temp dir with `debugfs rdump` (keeps owners, modes).
pub fn dump(disk: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("tempdir");
    let st = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", out.path().display()))
        .arg(disk)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run debugfs rdump");
    assert!(st.success(), "debugfs rdump failed");
    out
}

/// Names of entries in a directory, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every path under `dir`, relative, sorted (for "nothing else was written").
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(
                p.strip_prefix(dir)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned(),
            );
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Mode (permission bits incl. set-id/sticky), uid and gid of `path` in the disk,
/// from `debugfs stat` (rdump drops set-id and sticky bits).
pub fn stat(disk: &Path, path: &str) -> (u32, u32, u32) {
    let out = debugfs(disk, &format!("stat {path}"));
    let field = |name: &str| -> Option<String> {
        let i = out.find(name)?;
        out[i + name.len()..]
            .split_whitespace()
            .next()
            .map(str::to_string)
    };
    let mode = field("Mode:").and_then(|m| u32::from_str_radix(&m, 8).ok());
    let uid = field("User:").and_then(|u| u.parse().ok());
    let gid = field("Group:").and_then(|g| g.parse().ok());
    match (mode, uid, gid) {
        (Some(m), Some(u), Some(g)) => (m, u, g),
        _ => panic!("cannot parse debugfs stat {path}: {out}"),
    }
}

/// A busybox image (static /bin/busybox with the applets the VM tests and benchmarks
/// use) and its config: layers with media types, config JSON.
pub fn busybox_image() -> (Vec<(Vec<u8>, &'static str)>, Vec<u8>) {
    use plfm_node_agent::image::testtar::{Layer, TarEntry};
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox");
    // Three layers, like a real image: the VM's root is a stack of three disks.
    // The base has busybox and most applets, and a file the middle layer whites out;
    // the middle layer adds `httpd` (a workload that serves proves it is mounted);
    // the top layer adds `/www/release`.
    let mut base = Layer::new();
    for d in [
        "bin", "etc", "tmp", "proc", "sys", "dev", "run", "www", "data",
    ] {
        base = base.dir(d, 0o755);
    }
    base = base.entry(TarEntry::file("bin/busybox", &busybox, 0o755));
    for applet in [
        "sh", "cat", "echo", "mkdir", "sleep", "dd", "head", "ls", "sync",
    ] {
        base = base.symlink(&format!("bin/{applet}"), "busybox");
    }
    base = base.file("etc/removed-by-a-layer", b"base\n");
    let middle = Layer::new()
        .symlink("bin/httpd", "busybox")
        .whiteout("etc/removed-by-a-layer");
    let top = Layer::new().file("www/release", b"top-layer\n");
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .expect("config JSON");
    (
        vec![
            (base.tar_gz(), GZIP),
            (middle.tar_gz(), GZIP),
            (top.tar_gz(), GZIP),
        ],
        config,
    )
}

/// Whiteouts (character devices) and opaque directories of a layer disk, as paths
/// relative to its root, found by walking it with `debugfs ls -p` and `ea_get`.
pub fn overlay_marks(disk: &Path) -> (Vec<String>, Vec<String>) {
    let (mut whiteouts, mut opaque) = (Vec::new(), Vec::new());
    let mut dirs = vec![String::new()];
    while let Some(dir) = dirs.pop() {
        let listing = debugfs(disk, &format!("ls -p \"/{dir}\""));
        for line in listing.lines() {
            // /ino/mode/uid/gid/name/size/
            let f: Vec<&str> = line.split('/').collect();
            if f.len() < 7
                || f[5] == "."
                || f[5] == ".."
                || (dir.is_empty() && f[5] == "lost+found")
            {
                continue;
            }
            let rel = if dir.is_empty() {
                f[5].to_string()
            } else {
                format!("{dir}/{}", f[5])
            };
            match &f[2][..f[2].len().saturating_sub(4)] {
                "04" => {
                    if debugfs(disk, &format!("ea_get \"/{rel}\" trusted.overlay.opaque"))
                        .contains("= \"y\"")
                    {
                        opaque.push(rel.clone());
                    }
                    dirs.push(rel);
                }
                "02" => whiteouts.push(rel),
                _ => {}
            }
        }
    }
    whiteouts.sort();
    opaque.sort();
    (whiteouts, opaque)
}

/// The root as guest init's overlay shows a stack of layer disks (bottom first):
/// each disk is dumped with `debugfs rdump` and laid over the ones below, after its
/// whiteouts removed what they hide and its opaque directories were emptied.
pub fn merged(layers: &[PathBuf]) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("tempdir");
    for disk in layers {
        let (whiteouts, opaque) = overlay_marks(disk);
        for p in opaque.iter().chain(&whiteouts) {
            let target = out.path().join(p);
            if opaque.contains(p) {
                for n in names(&target) {
                    let c = target.join(n);
                    let _ = std::fs::remove_dir_all(&c).or_else(|_| std::fs::remove_file(&c));
                }
            } else {
                let _ = std::fs::remove_dir_all(&target).or_else(|_| std::fs::remove_file(&target));
            }
        }
        let d = dump(disk);
        let _ = std::fs::remove_dir_all(d.path().join("lost+found"));
        let st = Command::new("cp")
            .args(["-a", "--remove-destination"])
            .arg(format!("{}/.", d.path().display()))
            .arg(out.path())
            .status()
            .expect("run cp");
        assert!(st.success(), "cp -a of a layer dump failed");
    }
    out
}

/// [`stat`] of `path` in the top-most layer disk that has it.
pub fn stat_in(layers: &[PathBuf], path: &str) -> (u32, u32, u32) {
    let disk = layers
        .iter()
        .rev()
        .find(|d| !debugfs(d, &format!("stat {path}")).is_empty())
        .unwrap_or_else(|| panic!("{path} in no layer"));
    stat(disk, path)
}

/// A benchmark knob from the environment (`PLFM_BENCH_*`), or `default`.
pub fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak RSS (`VmHWM`, KiB) of process `pid` (`"self"` for this one).
pub fn vmhwm_kib(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
