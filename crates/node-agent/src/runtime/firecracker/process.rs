//! The Firecracker process in Firecracker's own terms: its command line (plain or
//! under `jailer`, with the jailer's cgroup arguments for this host), the chroot of a
//! jailed VMM, and the meaning of its exit codes. Spawning, identity and waits are the
//! shared VMM layer's ([`crate::runtime::vmm::process`]).

use std::path::{Path, PathBuf};

use crate::cgroup::{shares_of_weight, VMM_PIDS_MAX};

/// The meaning of a Firecracker exit code (v1.x `FcExitCode`).
pub fn exit_code_meaning(code: i32) -> Option<&'static str> {
    Some(match code {
        0 => "ok",
        1 => "generic error",
        148 => "seccomp violation (bad syscall)",
        149 => "SIGBUS",
        150 => "SIGSEGV",
        151 => "SIGXFSZ (file size limit exceeded)",
        152 => "bad configuration",
        153 => "argument parsing failed",
        154 => "SIGXCPU (CPU time limit exceeded)",
        155 => "SIGPIPE",
        156 => "SIGHUP",
        157 => "SIGILL",
        _ => return None,
    })
}

/// How one VMM is launched.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Program to execute (firecracker or jailer).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// File receiving stdout and stderr (the guest console).
    pub console_log: PathBuf,
}

/// Arguments of `firecracker` itself.
pub fn firecracker_args(api_sock: &Path, id: &str) -> Vec<String> {
    vec![
        "--api-sock".into(),
        api_sock.display().to_string(),
        "--id".into(),
        id.to_string(),
    ]
}

/// The jailer's settings for one VMM.
#[derive(Debug, Clone)]
pub struct JailerArgs<'a> {
    /// The firecracker binary (`--exec-file`).
    pub exec_file: &'a Path,
    /// Instance id (`--id`).
    pub id: &'a str,
    /// Uid the VMM runs as.
    pub uid: u32,
    /// Gid the VMM runs as.
    pub gid: u32,
    /// `--chroot-base-dir`.
    pub chroot_base_dir: &'a Path,
    /// How the jailer confines the VMM in cgroups on this host.
    pub cgroups: &'a JailerCgroups,
    /// Memory limit of the VMM's cgroup (guest memory plus overhead), bytes.
    pub memory_max: u64,
    /// CPU weight of the VMM's cgroup (1..=10000, cgroup v2 scale).
    pub cpu_weight: u32,
}

/// Arguments of `jailer … --new-pid-ns -- <firecracker args>`; the API socket path is
/// relative to the chroot (`/run/firecracker.socket`).
///
/// Only `--api-sock` follows `--`: the jailer itself passes `--id`, `--start-time-us`
/// and `--start-time-cpu-us` to Firecracker, which refuses an argument given twice
/// (exit 153, "The argument 'id' was provided more than once").
pub fn jailer_args(j: &JailerArgs<'_>) -> Vec<String> {
    let mut args = vec![
        "--id".into(),
        j.id.to_string(),
        "--exec-file".into(),
        j.exec_file.display().to_string(),
        "--uid".into(),
        j.uid.to_string(),
        "--gid".into(),
        j.gid.to_string(),
        "--chroot-base-dir".into(),
        j.chroot_base_dir.display().to_string(),
        // Firecracker becomes init of a pid namespace of its own: it sees no other
        // process, and everything it forks dies with it. The jailer then exits after
        // writing Firecracker's pid to `<chroot>/firecracker.pid`.
        "--new-pid-ns".into(),
    ];
    args.extend(j.cgroups.args(j.memory_max, j.cpu_weight));
    args.extend(["--".into(), "--api-sock".into(), JAILED_API_SOCK.into()]);
    args
}

/// The cgroup interface the jailer uses on this host, found once at start from
/// `/proc/self/mounts` ([`JailerCgroups::detect`]). The jailer itself looks for the
/// controllers of its `--cgroup` files in `/proc/mounts`; passing cgroup v2 files on a
/// v1 host (or v1 files on a v2 host) makes it fail (`CgroupControllerUnavailable`), so
/// the agent passes what the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JailerCgroups {
    /// Unified hierarchy with the `memory` and `cpu` controllers: `memory.max`,
    /// `cpu.weight`.
    V2 {
        /// Mount point of the cgroup2 filesystem.
        mount: PathBuf,
        /// `--parent-cgroup` (relative to the mount).
        parent: String,
    },
    /// Legacy hierarchies: `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`
    /// when swap is accounted), `pids.max`, `cpu.shares`.
    V1 {
        /// Mount point of the `memory` hierarchy.
        memory: PathBuf,
        /// Mount point of the `cpu` hierarchy.
        cpu: PathBuf,
        /// Mount point of the `pids` hierarchy.
        pids: PathBuf,
        /// The host accounts swap (`memory.memsw.limit_in_bytes` exists).
        memsw: bool,
        /// `--parent-cgroup` (relative to each mount).
        parent: String,
    },
    /// No usable hierarchy: jailed VMs cannot run on this host (the string says why).
    Unavailable(String),
}

/// The default `--parent-cgroup` of jailed VMMs: `<mount>/plfm-firecracker/<vmm id>`.
pub const JAILER_CGROUP_PARENT: &str = "plfm-firecracker";

impl JailerCgroups {
    /// Finds the hierarchy from the text of `/proc/self/mounts`. `controllers_v2` reads
    /// `cgroup.controllers` of a cgroup2 mount; `has_file` tells whether a file exists.
    /// v2 wins when its mount offers `memory`, `cpu` and `pids` (a hybrid host's empty
    /// `unified` mount does not); else v1 when the three controllers have a hierarchy.
    pub fn from_mounts(
        mounts: &str,
        controllers_v2: &dyn Fn(&Path) -> Option<String>,
        has_file: &dyn Fn(&Path) -> bool,
        parent: &str,
    ) -> JailerCgroups {
        let mut v1_memory = None;
        let mut v1_cpu = None;
        let mut v1_pids = None;
        let mut v2_seen = Vec::new();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(dir), Some(fstype)) = (f.get(1), f.get(2)) else {
                continue;
            };
            let dir = PathBuf::from(unescape_mount_path(dir));
            match *fstype {
                "cgroup2" => {
                    let c = controllers_v2(&dir).unwrap_or_default();
                    let has = |n: &str| c.split_whitespace().any(|x| x == n);
                    if has("memory") && has("cpu") && has("pids") {
                        return JailerCgroups::V2 {
                            mount: dir,
                            parent: parent.to_string(),
                        };
                    }
                    v2_seen.push(format!("{} (controllers: {:?})", dir.display(), c.trim()));
                }
                "cgroup" => {
                    let opts = f.get(3).copied().unwrap_or("");
                    let has = |n: &str| opts.split(',').any(|o| o == n);
                    if has("memory") && v1_memory.is_none() {
                        v1_memory = Some(dir.clone());
                    }
                    if has("pids") && v1_pids.is_none() {
                        v1_pids = Some(dir.clone());
                    }
                    if has("cpu") && v1_cpu.is_none() {
                        v1_cpu = Some(dir);
                    }
                }
                _ => {}
            }
        }
        match (v1_memory, v1_cpu, v1_pids) {
            (Some(memory), Some(cpu), Some(pids)) => JailerCgroups::V1 {
                memsw: has_file(&memory.join("memory.memsw.limit_in_bytes")),
                memory,
                cpu,
                pids,
                parent: parent.to_string(),
            },
            (m, c, p) => JailerCgroups::Unavailable(format!(
                "no cgroup hierarchy with the memory, cpu and pids controllers in /proc/self/mounts \
                 (cgroup2: {}; cgroup v1 memory: {}, cpu: {}, pids: {}); the jailer cannot confine a VMM \
                 here (under `ip netns exec`, which remounts /sys, mount the cgroup hierarchies \
                 again or use `unshare -n`)",
                if v2_seen.is_empty() {
                    "none".to_string()
                } else {
                    v2_seen.join(", ")
                },
                m.map_or("none".to_string(), |p| p.display().to_string()),
                c.map_or("none".to_string(), |p| p.display().to_string()),
                p.map_or("none".to_string(), |p| p.display().to_string()),
            )),
        }
    }

    /// Detects the host's hierarchy (Linux); elsewhere always unavailable.
    pub fn detect(parent: &str) -> JailerCgroups {
        match std::fs::read_to_string("/proc/self/mounts") {
            Ok(text) => Self::from_mounts(
                &text,
                &|dir| std::fs::read_to_string(dir.join("cgroup.controllers")).ok(),
                &|p| p.is_file(),
                parent,
            ),
            Err(e) => JailerCgroups::Unavailable(format!("cannot read /proc/self/mounts: {e}")),
        }
    }

    /// The jailer arguments for a VMM limited to `memory_max` bytes, `cpu_weight` and
    /// [`VMM_PIDS_MAX`] tasks.
    /// Empty when unavailable (the runtime refuses to start such a VMM first).
    pub fn args(&self, memory_max: u64, cpu_weight: u32) -> Vec<String> {
        let weight = cpu_weight.clamp(1, 10_000);
        let mut a: Vec<String> = Vec::new();
        let mut cgroup = |kv: String| {
            a.push("--cgroup".into());
            a.push(kv);
        };
        let parent = match self {
            JailerCgroups::V2 { parent, .. } => {
                cgroup(format!("memory.max={memory_max}"));
                cgroup(format!("cpu.weight={weight}"));
                cgroup(format!("pids.max={VMM_PIDS_MAX}"));
                parent
            }
            JailerCgroups::V1 { memsw, parent, .. } => {
                cgroup(format!("memory.limit_in_bytes={memory_max}"));
                if *memsw {
                    // memory + swap = memory: the VMM gets no swap (as on v2 with the
                    // agent's own groups). Written after memory.limit_in_bytes, which
                    // memsw must never be below.
                    cgroup(format!("memory.memsw.limit_in_bytes={memory_max}"));
                }
                cgroup(format!("cpu.shares={}", shares_of_weight(weight)));
                cgroup(format!("pids.max={VMM_PIDS_MAX}"));
                parent
            }
            JailerCgroups::Unavailable(_) => return a,
        };
        let version = if matches!(self, JailerCgroups::V2 { .. }) {
            "2"
        } else {
            "1"
        };
        let mut out = vec![
            "--cgroup-version".to_string(),
            version.to_string(),
            "--parent-cgroup".to_string(),
            parent.clone(),
        ];
        out.extend(a);
        out
    }

    /// The cgroup directories the jailer creates for VMM `id` (to remove at cleanup).
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self {
            JailerCgroups::V2 { mount, parent } => vec![mount.join(parent).join(id)],
            JailerCgroups::V1 {
                memory,
                cpu,
                pids,
                parent,
                ..
            } => {
                let mut v = vec![memory.join(parent).join(id)];
                for m in [cpu, pids] {
                    let d = m.join(parent).join(id);
                    if !v.contains(&d) {
                        v.push(d);
                    }
                }
                v
            }
            JailerCgroups::Unavailable(_) => vec![],
        }
    }
}

impl JailerCgroups {
    /// Names of the VMM groups that exist under the parent (in any controller).
    pub fn children(&self) -> Vec<String> {
        let parents: Vec<PathBuf> = self
            .dirs("x")
            .iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect();
        let mut names: Vec<String> = parents
            .iter()
            .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Pids in the VMM group `id` (any controller).
    pub fn pids(&self, id: &str) -> Vec<u32> {
        crate::cgroup::procs_of(&self.dirs(id))
    }
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The API socket path as the jailed firecracker sees it.
pub const JAILED_API_SOCK: &str = "/run/firecracker.socket";

/// The chroot of a jailed VMM: `<base>/<exec file name>/<id>/root`.
pub fn chroot_dir(chroot_base_dir: &Path, exec_file: &Path, id: &str) -> PathBuf {
    let name = exec_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "firecracker".into());
    chroot_base_dir.join(name).join(id).join("root")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_firecracker_exit_code_has_its_meaning() {
        let want = [
            (148, "seccomp"),
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
        for (code, word) in want {
            let m = exit_code_meaning(code).unwrap_or_default();
            assert!(m.contains(word), "{code}: {m}");
        }
    }

    const HYBRID_MOUNTS: &str = "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";
    const V2_MOUNTS: &str = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec 0 0\n";

    fn detect(mounts: &str, v2_controllers: &str, memsw: bool) -> JailerCgroups {
        let c = v2_controllers.to_string();
        JailerCgroups::from_mounts(
            mounts,
            &move |_| Some(c.clone()),
            &move |p| memsw && p.ends_with("memory.memsw.limit_in_bytes"),
            JAILER_CGROUP_PARENT,
        )
    }

    fn jailer_line(cgroups: &JailerCgroups) -> String {
        jailer_args(&JailerArgs {
            exec_file: Path::new("/usr/bin/firecracker"),
            id: "i-1",
            uid: 123,
            gid: 100,
            chroot_base_dir: Path::new("/srv/jailer"),
            cgroups,
            memory_max: 1 << 30,
            cpu_weight: 200,
        })
        .join(" ")
    }

    #[test]
    fn jailer_passes_only_the_api_socket_to_firecracker() {
        // The jailer adds `--id` itself; Firecracker refuses a duplicate (exit 153).
        let s = jailer_line(&detect(V2_MOUNTS, "cpuset cpu io memory pids", false));
        let (jailer, fc) = s.split_once(" -- ").expect("a -- separator");
        assert_eq!(fc, "--api-sock /run/firecracker.socket");
        assert!(jailer.starts_with("--id i-1 --exec-file /usr/bin/firecracker --uid 123 --gid 100 --chroot-base-dir /srv/jailer --new-pid-ns "), "{jailer}");
        assert_eq!(
            chroot_dir(
                Path::new("/srv/jailer"),
                Path::new("/usr/bin/firecracker"),
                "i-1"
            ),
            PathBuf::from("/srv/jailer/firecracker/i-1/root")
        );
    }

    #[test]
    fn cgroup_v2_host_gets_memory_max_cpu_weight_and_pids_max() {
        let c = detect(V2_MOUNTS, "cpuset cpu io memory pids", false);
        assert_eq!(
            c,
            JailerCgroups::V2 {
                mount: "/sys/fs/cgroup".into(),
                parent: JAILER_CGROUP_PARENT.into()
            }
        );
        let s = jailer_line(&c);
        assert!(s.contains("--cgroup-version 2 --parent-cgroup plfm-firecracker --cgroup memory.max=1073741824 --cgroup cpu.weight=200 --cgroup pids.max=1024 --"), "{s}");
        // Without the pids controller the unified mount is not enough.
        assert!(
            matches!(detect(V2_MOUNTS, "cpuset cpu io memory", false), JailerCgroups::Unavailable(ref w) if w.contains("pids: none")),
            "a v2 mount without pids"
        );
        assert_eq!(
            c.dirs("i-1"),
            vec![PathBuf::from("/sys/fs/cgroup/plfm-firecracker/i-1")]
        );
    }

    #[test]
    fn cgroup_v1_host_gets_limit_in_bytes_cpu_shares_and_pids_max() {
        // A hybrid host (this project's CI): the unified mount has no controllers.
        let c = detect(HYBRID_MOUNTS, "", true);
        let s = jailer_line(&c);
        assert!(s.contains("--cgroup-version 1 --parent-cgroup plfm-firecracker --cgroup memory.limit_in_bytes=1073741824 --cgroup memory.memsw.limit_in_bytes=1073741824 --cgroup cpu.shares=2048 --cgroup pids.max=1024 --"), "{s}");
        assert!(
            !s.contains("memory.max") && !s.contains("cpu.weight"),
            "{s}"
        );
        assert_eq!(
            c.dirs("i-1"),
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/plfm-firecracker/i-1"),
                PathBuf::from("/sys/fs/cgroup/cpu/plfm-firecracker/i-1"),
                PathBuf::from("/sys/fs/cgroup/pids/plfm-firecracker/i-1")
            ]
        );
        // Without swap accounting there is no memsw file to write.
        let s = jailer_line(&detect(HYBRID_MOUNTS, "", false));
        assert!(!s.contains("memsw"), "{s}");
        // Shared mounts (cpu,cpuacct) are found by their options.
        let c = detect(
            "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\ncgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n",
            "",
            false,
        );
        assert!(
            matches!(c, JailerCgroups::V1 { ref cpu, .. } if cpu == Path::new("/sys/fs/cgroup/cpu,cpuacct")),
            "{c:?}"
        );
    }

    #[test]
    fn no_cgroup_hierarchy_says_why_and_passes_no_cgroup_args() {
        // `ip netns exec` remounts /sys: no cgroup mount is left.
        let c = detect("sysfs /sys sysfs rw 0 0\n", "", false);
        let JailerCgroups::Unavailable(why) = &c else {
            panic!("{c:?}")
        };
        assert!(why.contains("memory, cpu and pids controllers"), "{why}");
        assert!(c.args(1 << 30, 100).is_empty());
        assert!(c.dirs("i-1").is_empty());
        // v1 with memory only is not enough either.
        let c = detect(
            "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n",
            "",
            false,
        );
        assert!(
            matches!(c, JailerCgroups::Unavailable(ref w) if w.contains("cpu: none")),
            "{c:?}"
        );
        // v1 without a pids hierarchy: the jailer could not set pids.max.
        let c = detect(
            "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n",
            "",
            false,
        );
        assert!(
            matches!(c, JailerCgroups::Unavailable(ref w) if w.contains("pids: none")),
            "{c:?}"
        );
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/a\\999"), "/a\\999");
        assert_eq!(unescape_mount_path("/x\\"), "/x\\");
    }
}
