//! Host memory cgroups for the VMM processes (DESIGN §2, `oom_killed`: "the host cgroup
//! killed the VMM").
//!
//! What it owns: finding a usable memory controller at start (cgroup v2, the unified
//! hierarchy at `/sys/fs/cgroup` with `memory` in `cgroup.controllers`; or cgroup v1, a
//! `memory` hierarchy at `/sys/fs/cgroup/memory`), the parent group (by default `plfm`
//! under the agent's own memory cgroup from `/proc/self/cgroup`), and per instance one
//! group `<parent>/<instance id>`: create it with its limit (v2 `memory.max` and
//! `memory.swap.max = 0`; v1 `memory.limit_in_bytes` and `memory.memsw.limit_in_bytes`),
//! place a process in it from the forked child before `exec` ([`Entry::join`]), read
//! its OOM-kill counter (v2 `memory.events`, v1 `memory.oom_control`, both `oom_kill N`),
//! and remove it once its processes are gone.
//!
//! The contract: the caller records a group in the resource ledger before
//! [`Hierarchy::create`] and forgets it after [`Group::remove`]; a VMM is placed with
//! [`Entry::join`] in `pre_exec`, so it is charged from its first instruction. This
//! module must not move the agent itself, change any limit outside its own groups
//! (on v2 it only adds `+memory` to the `cgroup.subtree_control` of the ancestors of
//! the parent), kill processes, or decide what an OOM kill means (the runtime reports
//! it; the instance actor decides). Writing under `/sys/fs/cgroup` needs root: without
//! it (or on a read-only mount, or without a memory controller) [`Hierarchy::detect`]
//! returns [`CgroupError::Unavailable`] and the runtime runs its VMMs unconfined.

use serde::{Deserialize, Serialize};

/// `runtime.qemu.cgroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CgroupMode {
    /// Use a memory cgroup per instance when the host has a usable one; warn once and
    /// run without otherwise.
    #[default]
    Auto,
    /// Never create cgroups.
    Off,
}

/// The cgroup interface a hierarchy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Legacy per-controller hierarchies (`/sys/fs/cgroup/memory`).
    V1,
    /// The unified hierarchy (`/sys/fs/cgroup`).
    V2,
}

/// Errors of this module; each names the group or file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No memory cgroup can be managed on this host (not root, read-only, no controller).
    #[error("no usable memory cgroup: {0}")]
    Unavailable(String),
    /// A cgroup file or directory operation failed.
    #[error("cgroup {path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file did not have the expected content.
    #[error("cgroup {path}: {what}")]
    Format {
        /// The file.
        path: String,
        /// What was wrong.
        what: String,
    },
    /// The group still had processes when its removal deadline passed.
    #[error("cgroup {path}: still has processes {pids:?} after {waited_ms} ms")]
    Busy {
        /// The group.
        path: String,
        /// Processes left in it.
        pids: Vec<u32>,
        /// How long removal waited.
        waited_ms: u64,
    },
}

/// The agent's own cgroup path for `version` from the text of `/proc/self/cgroup`:
/// v2 is the `0::<path>` line, v1 the line whose controller list has `memory`.
pub fn own_cgroup(proc_self_cgroup: &str, version: Version) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match version {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "memory"),
        };
        (wanted && path.starts_with('/')).then(|| path.to_string())
    })
}

/// The `oom_kill N` counter from the text of v2 `memory.events` or v1
/// `memory.oom_control`.
pub fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == "oom_kill").then_some(())?;
        it.next()?.parse().ok()
    })
}

/// Whether a controller list (`cgroup.controllers`, `cgroup.subtree_control`) names
/// `memory`.
pub fn lists_memory(text: &str) -> bool {
    text.split_whitespace().any(|c| c == "memory")
}

/// Checks `runtime.qemu.cgroup_parent`: an absolute path inside the memory hierarchy,
/// not its root, without `.`/`..` or empty components.
pub fn validate_parent(p: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{p:?} {why} (a path inside the memory cgroup hierarchy, e.g. \"/plfm\")"
        ))
    };
    let Some(rest) = p.strip_prefix('/') else {
        return bad("is not absolute");
    };
    if rest.is_empty() {
        return bad("is the root of the hierarchy");
    }
    if p.contains('\0') {
        return bad("contains NUL");
    }
    for c in rest.trim_end_matches('/').split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return bad("has an empty, '.' or '..' component");
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
pub use linux::{Entry, Group, Hierarchy};

#[cfg(target_os = "linux")]
mod linux {
    use std::os::fd::OwnedFd;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::{lists_memory, own_cgroup, parse_oom_kills, CgroupError, Version};

    const ROOT: &str = "/sys/fs/cgroup";

    fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
        move |source| CgroupError::Io {
            path: path.display().to_string(),
            op,
            source,
        }
    }

    fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
        std::fs::write(path, value).map_err(io(path, "write"))
    }

    /// The memory hierarchy in use and the parent of the per-instance groups.
    #[derive(Debug, Clone)]
    pub struct Hierarchy {
        version: Version,
        parent: PathBuf,
    }

    impl Hierarchy {
        /// Finds the memory controller and creates the parent group. `parent` is a path
        /// inside the hierarchy (validated by [`super::validate_parent`]); `None` means
        /// `<own cgroup>/plfm`. Needs root; on v2 it enables `+memory` in the
        /// `cgroup.subtree_control` of each group from the root down to the parent,
        /// which the kernel refuses for a group that has processes of its own (then set
        /// `cgroup_parent` to a group outside the agent's, e.g. a delegated slice).
        pub fn detect(parent: Option<&str>) -> Result<Hierarchy, CgroupError> {
            let unavailable = |why: String| CgroupError::Unavailable(why);
            let root = Path::new(ROOT);
            let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
                .is_ok_and(|c| lists_memory(&c));
            let (version, mount) = if v2 {
                (Version::V2, root.to_path_buf())
            } else if root.join("memory/memory.limit_in_bytes").is_file() {
                (Version::V1, root.join("memory"))
            } else {
                return Err(unavailable(format!(
                    "neither {ROOT} (cgroup v2 with the memory controller) nor {ROOT}/memory (cgroup v1) is there"
                )));
            };
            let rel = match parent {
                Some(p) => p.to_string(),
                None => {
                    let text = std::fs::read_to_string("/proc/self/cgroup")
                        .map_err(|e| unavailable(format!("/proc/self/cgroup: {e}")))?;
                    let own = own_cgroup(&text, version).ok_or_else(|| {
                        unavailable(format!(
                            "/proc/self/cgroup has no {version:?} memory line: {text:?}"
                        ))
                    })?;
                    format!("{}/plfm", own.trim_end_matches('/'))
                }
            };
            let mut dir = mount.clone();
            let components: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
            for (i, c) in components.iter().enumerate() {
                if version == Version::V2 {
                    enable_memory(&dir)?;
                }
                dir.push(c);
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(unavailable(format!(
                            "mkdir {}: {e}{}",
                            dir.display(),
                            if i + 1 < components.len() {
                                ""
                            } else {
                                " (needs root and a writable cgroup mount)"
                            }
                        )))
                    }
                }
            }
            if version == Version::V2 {
                enable_memory(&dir)?;
            } else if !dir.join("memory.limit_in_bytes").is_file() {
                return Err(unavailable(format!(
                    "{} has no memory.limit_in_bytes",
                    dir.display()
                )));
            }
            Ok(Hierarchy {
                version,
                parent: dir,
            })
        }

        /// v1 or v2.
        pub fn version(&self) -> Version {
            self.version
        }

        /// The parent directory of the per-instance groups.
        pub fn parent(&self) -> &Path {
            &self.parent
        }

        /// The group of an instance (not created).
        pub fn group(&self, name: &str) -> Group {
            Group {
                path: self.parent.join(name),
            }
        }

        /// Creates (or reuses) the group `name` with a memory limit of `limit` bytes
        /// and no swap. The caller has recorded it in the ledger first.
        pub fn create(&self, name: &str, limit: u64) -> Result<Group, CgroupError> {
            let g = self.group(name);
            match std::fs::create_dir(&g.path) {
                Ok(()) => {}
                // An instance id like `memory.max` names a control file of the parent,
                // not a group: reusing it would leave the VMM without a limit.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if !std::fs::symlink_metadata(&g.path).is_ok_and(|m| m.is_dir()) {
                        return Err(CgroupError::Format {
                            path: g.path.display().to_string(),
                            what: format!(
                                "the name {name:?} is a control file of the parent, not a group"
                            ),
                        });
                    }
                }
                Err(e) => return Err(io(&g.path, "mkdir")(e)),
            }
            let limit_s = limit.to_string();
            match self.version {
                Version::V2 => {
                    write(&g.path.join("memory.max"), &limit_s)?;
                    let swap = g.path.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                    // One OOM kill takes the whole VMM (QEMU and its vhost daemon).
                    let _ = std::fs::write(g.path.join("memory.oom.group"), "1");
                }
                Version::V1 => {
                    // memsw (memory + swap) must stay >= the memory limit: order the two
                    // writes so that holds whether the limit grows or shrinks.
                    let mem = g.path.join("memory.limit_in_bytes");
                    let memsw = g.path.join("memory.memsw.limit_in_bytes");
                    if !memsw.exists() {
                        write(&mem, &limit_s)?;
                    } else if write(&mem, &limit_s).is_ok() {
                        write(&memsw, &limit_s)?;
                    } else {
                        write(&memsw, &limit_s)?;
                        write(&mem, &limit_s)?;
                    }
                }
            }
            Ok(g)
        }

        /// Names of the groups under the parent.
        pub fn children(&self) -> Vec<String> {
            std::fs::read_dir(&self.parent)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        }
    }

    /// Adds `memory` to `dir/cgroup.subtree_control` unless it is there (v2).
    fn enable_memory(dir: &Path) -> Result<(), CgroupError> {
        let control = dir.join("cgroup.subtree_control");
        let now = std::fs::read_to_string(&control)
            .map_err(|e| CgroupError::Unavailable(format!("{}: {e}", control.display())))?;
        if lists_memory(&now) {
            return Ok(());
        }
        std::fs::write(&control, "+memory").map_err(|e| {
            CgroupError::Unavailable(format!(
                "enable memory in {}: {e} (a group with processes of its own cannot delegate controllers; set runtime.qemu.cgroup_parent to a group outside the agent's)",
                control.display()
            ))
        })
    }

    /// One per-instance group.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Group {
        path: PathBuf,
    }

    impl Group {
        /// The group at `path` (e.g. from the resource ledger).
        pub fn at(path: impl Into<PathBuf>) -> Group {
            Group { path: path.into() }
        }

        /// Its directory.
        pub fn path(&self) -> &Path {
            &self.path
        }

        fn is_v2(&self) -> bool {
            self.path.join("memory.events").exists()
        }

        /// Opens `cgroup.procs` for [`Entry::join`]; call before forking.
        pub fn entry(&self) -> Result<Entry, CgroupError> {
            let p = self.path.join("cgroup.procs");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(io(&p, "open"))?;
            Ok(Entry(OwnedFd::from(f)))
        }

        /// How many processes the kernel has OOM-killed in this group.
        pub fn oom_kills(&self) -> Result<u64, CgroupError> {
            let p = self.path.join(if self.is_v2() {
                "memory.events"
            } else {
                "memory.oom_control"
            });
            let text = std::fs::read_to_string(&p).map_err(io(&p, "read"))?;
            parse_oom_kills(&text).ok_or_else(|| CgroupError::Format {
                path: p.display().to_string(),
                what: "no oom_kill line".into(),
            })
        }

        /// The memory limit in bytes.
        pub fn limit(&self) -> Option<u64> {
            let f = if self.is_v2() {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            std::fs::read_to_string(self.path.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        }

        /// The highest memory use seen (v1 `memory.max_usage_in_bytes`, v2
        /// `memory.peak` where the kernel has it).
        pub fn peak(&self) -> Option<u64> {
            let f = if self.is_v2() {
                "memory.peak"
            } else {
                "memory.max_usage_in_bytes"
            };
            std::fs::read_to_string(self.path.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        }

        /// Processes in the group.
        pub fn pids(&self) -> Vec<u32> {
            std::fs::read_to_string(self.path.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        }

        /// Removes the group, retrying while its processes drain (the caller has
        /// stopped them), up to `within`. A group that is already gone is fine.
        pub async fn remove(&self, within: Duration) -> Result<(), CgroupError> {
            let start = tokio::time::Instant::now();
            loop {
                match std::fs::remove_dir(&self.path) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {
                        if start.elapsed() >= within {
                            return Err(CgroupError::Busy {
                                path: self.path.display().to_string(),
                                pids: self.pids(),
                                waited_ms: start.elapsed().as_millis() as u64,
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(io(&self.path, "rmdir")(e)),
                }
            }
        }
    }

    /// An open `cgroup.procs` of a group, for placing a child before it runs.
    #[derive(Debug)]
    pub struct Entry(OwnedFd);

    impl Entry {
        /// A second handle on the same file (for a second process).
        pub fn try_clone(&self) -> std::io::Result<Entry> {
            self.0.try_clone().map(Entry)
        }

        /// Moves the calling process into the group. Meant for `pre_exec`: it makes one
        /// `write(2)` of a static buffer to a descriptor opened before the fork, which
        /// is async-signal-safe and allocates nothing.
        pub fn join(&self) -> std::io::Result<()> {
            rustix::io::write(&self.0, b"0")
                .map(|_| ())
                .map_err(std::io::Error::from)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_HYBRID: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/1643c4\n2:cpuacct:/\n1:cpu:/\n0::/\n";
    const V1_JOINED: &str = "5:cpu,cpuacct:/x\n3:memory,hugetlb:/system.slice/plfm.service\n0::/\n";
    const V2: &str = "0::/system.slice/plfm-node-agent.service\n";

    #[test]
    fn own_cgroup_reads_the_memory_line_of_v1_and_the_unified_line_of_v2() {
        assert_eq!(
            own_cgroup(V1_HYBRID, Version::V1).as_deref(),
            Some("/process_api/1643c4")
        );
        assert_eq!(
            own_cgroup(V1_JOINED, Version::V1).as_deref(),
            Some("/system.slice/plfm.service")
        );
        assert_eq!(own_cgroup(V1_HYBRID, Version::V2).as_deref(), Some("/"));
        assert_eq!(
            own_cgroup(V2, Version::V2).as_deref(),
            Some("/system.slice/plfm-node-agent.service")
        );
        assert_eq!(own_cgroup(V2, Version::V1), None);
        assert_eq!(own_cgroup("", Version::V2), None);
        assert_eq!(own_cgroup("garbage\n4:memory\n", Version::V1), None);
    }

    #[test]
    fn oom_kill_counter_parses_from_v2_events_and_v1_oom_control() {
        let v2 = "low 0\nhigh 0\nmax 17\noom 2\noom_kill 2\noom_group_kill 1\n";
        assert_eq!(parse_oom_kills(v2), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n";
        assert_eq!(parse_oom_kills(v1), Some(1));
        // Older v1 kernels have no counter: unknown, not zero.
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
        assert_eq!(parse_oom_kills("oom_kill x\n"), None);
    }

    #[test]
    fn controller_lists_name_memory_exactly() {
        assert!(lists_memory("cpuset cpu io memory hugetlb pids\n"));
        assert!(!lists_memory("cpuset cpu io hugetlb pids\n"));
        assert!(!lists_memory("memory_x\n"));
    }

    #[test]
    fn qemu_cgroup_keys_parse_default_and_are_validated_with_their_names() {
        use crate::runtime::qemu::QemuConfig;
        let base = "kernel = \"/k\"\ninitramfs = \"/i\"\n";
        let parse = |extra: &str| toml::from_str::<QemuConfig>(&format!("{base}{extra}"));
        let c = parse("").unwrap();
        assert_eq!(c.cgroup, CgroupMode::Auto);
        assert_eq!(c.cgroup_parent, None);
        assert!(c.memory_overhead_mib >= 128, "{}", c.memory_overhead_mib);
        assert!(c.validate().is_ok());
        let c =
            parse("cgroup = \"off\"\ncgroup_parent = \"/plfm.slice\"\nmemory_overhead_mib = 1\n")
                .unwrap();
        assert_eq!(c.cgroup, CgroupMode::Off);
        assert!(c.validate().is_ok());
        let err = parse("cgroup = \"v1\"\n").unwrap_err().to_string();
        assert!(err.contains("cgroup"), "{err}");
        let err = parse("cgroup_parnet = \"/x\"\n").unwrap_err().to_string();
        assert!(err.contains("cgroup_parnet"), "{err}");
        for (extra, key) in [
            ("cgroup_parent = \"plfm\"\n", "cgroup_parent:"),
            ("cgroup_parent = \"/a/../b\"\n", "cgroup_parent:"),
            ("memory_overhead_mib = 0\n", "memory_overhead_mib:"),
            ("memory_overhead_mib = 134217728\n", "memory_overhead_mib:"),
        ] {
            let err = parse(extra).unwrap().validate().unwrap_err();
            assert!(err.starts_with(key), "{extra}: {err}");
        }
    }

    #[test]
    fn cgroup_parent_must_be_an_absolute_path_below_the_root() {
        assert!(validate_parent("/plfm").is_ok());
        assert!(validate_parent("/system.slice/plfm.slice/").is_ok());
        for bad in ["plfm", "/", "", "/a/../b", "/a//b", "/./a", "/a\0"] {
            assert!(validate_parent(bad).is_err(), "{bad:?} accepted");
        }
    }
}
