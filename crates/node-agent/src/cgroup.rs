//! Host cgroups for the VMM processes: memory (DESIGN §2, `oom_killed`: "the host
//! cgroup killed the VMM"), pids and cpu (a VMM cannot fork-bomb the host or take more
//! than its share of the CPUs).
//!
//! What it owns: finding usable `memory`, `pids` and `cpu` controllers at start (cgroup
//! v2, the unified hierarchy at `/sys/fs/cgroup` whose `cgroup.controllers` lists all
//! three; or cgroup v1, one hierarchy per controller at `/sys/fs/cgroup/{memory,pids,
//! cpu}`), the parent group (by default `plfm` under the agent's own cgroup from
//! `/proc/self/cgroup`: on v1 the agent's own path in each hierarchy, so the parent is
//! one directory per hierarchy), and per instance one group `<parent>/<instance id>`
//! (on v1 one such directory in each hierarchy, the memory one first): create it with
//! its [`Limits`] (v2 `memory.max`, `memory.swap.max = 0`, `pids.max`, `cpu.weight`;
//! v1 `memory.limit_in_bytes`, `memory.memsw.limit_in_bytes`, `pids.max`, `cpu.shares`
//! from [`shares_of_weight`]), place a process in it from the forked child before
//! `exec` ([`Entry::join`]: every directory of the group), read its OOM-kill counter
//! (v2 `memory.events`, v1 `memory.oom_control`, both `oom_kill N`), and remove it
//! (every directory) once its processes are gone.
//!
//! The contract: the caller records each directory of a group in the resource ledger
//! before [`Hierarchy::create`] and forgets it after [`Group::remove`]; a VMM is placed
//! with [`Entry::join`] in `pre_exec`, so it is charged and limited from its first
//! instruction. This module must not move the agent itself, change any limit outside
//! its own groups (on v2 it only adds `+memory +pids +cpu` to the
//! `cgroup.subtree_control` of the ancestors of the parent), kill processes, or decide
//! what an OOM kill means (the runtime reports it; the instance actor decides). Writing
//! under `/sys/fs/cgroup` needs root: without it (or on a read-only mount, or when the
//! host lacks any of the three controllers) [`Hierarchy::detect`] returns
//! [`CgroupError::Unavailable`]; the runtime then refuses to start VMs
//! ([`CgroupMode::Required`], the default) or, only when configured so
//! ([`CgroupMode::Auto`]), runs its VMMs unconfined (a host without `pids` or `cpu` is
//! treated exactly like one without `memory`).

use serde::{Deserialize, Serialize};

/// `runtime.qemu.cgroup` / `runtime.firecracker.cgroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CgroupMode {
    /// A cgroup per instance (memory, pids, cpu) or no VM: on a host without usable
    /// ones (not root, read-only, a controller missing) every instance fails to start,
    /// naming the cause (fail closed; the default).
    #[default]
    Required,
    /// A cgroup per instance when the host has usable ones; otherwise warn once and run
    /// VMMs without host limits (an explicit opt-out for hosts that cannot have them).
    Auto,
    /// Never create cgroups.
    Off,
}

/// The cgroup interface a hierarchy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Legacy per-controller hierarchies (`/sys/fs/cgroup/memory`, `…/pids`, `…/cpu`).
    V1,
    /// The unified hierarchy (`/sys/fs/cgroup`).
    V2,
}

/// The controllers every per-instance group has, in the order of a group's v1
/// directories (memory first: its directory names the group in logs and the ledger).
pub const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Most tasks (processes and threads: both controllers count threads) a VMM's group
/// may hold, VMM and helpers together (`pids.max`, for the agent's own groups and for
/// the jailer's).
///
/// Why 1024: QEMU under TCG runs one thread per vCPU (at most 32 per VM, see
/// `guest::MAX_VCPUS`), its main loop, the RCU and I/O threads, and a block-layer worker
/// pool of up to 64 threads; vhost-device-vsock, in the same group, a few more;
/// Firecracker a handful (API, VMM, one per vCPU). That is under 128 in the worst
/// case, so 1024 leaves a wide margin for QEMU versions that spawn more while a guest
/// or a compromised VMM still cannot fork-bomb the host (the kernel's default
/// `pid_max` is 32768 on small hosts, 4 million on large ones).
pub const VMM_PIDS_MAX: u64 = 1024;

/// The limits of one per-instance group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory, bytes (`memory.max` / `memory.limit_in_bytes`); no swap.
    pub memory: u64,
    /// Tasks (`pids.max`), normally [`VMM_PIDS_MAX`].
    pub pids: u64,
    /// CPU weight on the v2 scale, 1..=10000 (`cpu.weight`; v1 `cpu.shares` through
    /// [`shares_of_weight`]).
    pub cpu_weight: u32,
}

/// cgroup v2 `cpu.weight` (1..=10000, default 100) on the v1 `cpu.shares` scale
/// (2..=262144, default 1024): linear, 1024 shares = weight 100 (as systemd maps
/// `CPUShares=` to `CPUWeight=`). The one mapping for the agent's own groups and the
/// jailer's.
pub fn shares_of_weight(weight: u32) -> u64 {
    (u64::from(weight.clamp(1, 10_000)) * 1024 / 100).clamp(2, 262_144)
}

/// Errors of this module; each names the group or file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroups can be managed on this host (not root, read-only, a controller
    /// missing).
    #[error("no usable cgroups (memory, pids and cpu): {0}")]
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

/// The agent's own memory cgroup path for `version` from the text of
/// `/proc/self/cgroup` ([`own_cgroup_of`] for `memory`).
pub fn own_cgroup(proc_self_cgroup: &str, version: Version) -> Option<String> {
    own_cgroup_of(proc_self_cgroup, version, "memory")
}

/// The agent's own cgroup path for `version` from the text of `/proc/self/cgroup`:
/// v2 is the `0::<path>` line, v1 the line whose controller list has `controller`
/// (hierarchies may be mounted together, e.g. `cpu,cpuacct`).
pub fn own_cgroup_of(proc_self_cgroup: &str, version: Version, controller: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match version {
            Version::V2 => id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == controller),
        };
        (wanted && path.starts_with('/')).then(|| path.to_string())
    })
}

/// The processes listed in the `cgroup.procs` of any of `dirs` (sorted, once each);
/// a directory that cannot be read lists none.
pub fn procs_of(dirs: &[std::path::PathBuf]) -> Vec<u32> {
    let mut pids: Vec<u32> = dirs
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
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
/// `controller` exactly.
pub fn lists(text: &str, controller: &str) -> bool {
    text.split_whitespace().any(|c| c == controller)
}

/// Whether a controller list (`cgroup.controllers`, `cgroup.subtree_control`) names
/// `memory`.
pub fn lists_memory(text: &str) -> bool {
    lists(text, "memory")
}

/// The [`CONTROLLERS`] a v2 controller list (`cgroup.controllers`,
/// `cgroup.subtree_control`) does not name, in their order.
pub fn missing_controllers(text: &str) -> Vec<&'static str> {
    CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !lists(text, c))
        .collect()
}

/// What to write to a v2 `cgroup.subtree_control` that lists `text` so that it also
/// delegates every one of [`CONTROLLERS`] (`+memory +pids +cpu`, only those missing);
/// `None` when it already does.
pub fn subtree_control_update(text: &str) -> Option<String> {
    let missing = missing_controllers(text);
    (!missing.is_empty()).then(|| {
        missing
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ")
    })
}

/// Checks `runtime.qemu.cgroup_parent`: an absolute path inside the cgroup
/// hierarchies (on v1 the same path in each of memory, pids and cpu), not their root,
/// without `.`/`..` or empty components.
pub fn validate_parent(p: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{p:?} {why} (a path inside the cgroup hierarchy, e.g. \"/plfm\")"
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

    use super::{
        lists, own_cgroup_of, parse_oom_kills, shares_of_weight, subtree_control_update,
        CgroupError, Limits, Version, CONTROLLERS,
    };

    const ROOT: &str = "/sys/fs/cgroup";

    /// A v1 controller's file that its hierarchy's root has (to find the hierarchy),
    /// and one every group below the root has (to check the parent is in it).
    fn v1_probes(controller: &str) -> (&'static str, &'static str) {
        match controller {
            "memory" => ("memory.limit_in_bytes", "memory.limit_in_bytes"),
            "pids" => ("cgroup.procs", "pids.max"),
            _ => ("cpu.shares", "cpu.shares"),
        }
    }

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

    /// The hierarchy in use and the parent of the per-instance groups.
    #[derive(Debug, Clone)]
    pub struct Hierarchy {
        version: Version,
        /// The parent in each hierarchy: on v2 one (the unified one); on v1 the memory,
        /// pids and cpu hierarchies' in that order (fewer when some are mounted
        /// together).
        parents: Vec<PathBuf>,
    }

    impl Hierarchy {
        /// Finds the memory, pids and cpu controllers and creates the parent group in
        /// each hierarchy. `parent` is a path inside the hierarchies (validated by
        /// [`super::validate_parent`]); `None` means `<own cgroup>/plfm`, with the
        /// agent's own path per hierarchy on v1. Needs root; on v2 it enables `+memory
        /// +pids +cpu` in the `cgroup.subtree_control` of each group from the root down
        /// to the parent, which the kernel refuses for a group that has processes of
        /// its own (then set `cgroup_parent` to a group outside the agent's, e.g. a
        /// delegated slice). A host without one of the three controllers is
        /// [`CgroupError::Unavailable`], like one without cgroups.
        pub fn detect(parent: Option<&str>) -> Result<Hierarchy, CgroupError> {
            let unavailable = |why: String| CgroupError::Unavailable(why);
            let root = Path::new(ROOT);
            let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
                .ok()
                .filter(|c| lists(c, "memory"));
            let self_cgroup = || {
                std::fs::read_to_string("/proc/self/cgroup")
                    .map_err(|e| unavailable(format!("/proc/self/cgroup: {e}")))
            };
            let rel_of = |text: &str, version: Version, controller: &str| match parent {
                Some(p) => Ok(p.to_string()),
                None => {
                    let own = own_cgroup_of(text, version, controller).ok_or_else(|| {
                        unavailable(format!(
                            "/proc/self/cgroup has no {version:?} {controller} line: {text:?}"
                        ))
                    })?;
                    Ok(format!("{}/plfm", own.trim_end_matches('/')))
                }
            };
            if let Some(controllers) = v2 {
                let missing = super::missing_controllers(&controllers);
                if !missing.is_empty() {
                    return Err(unavailable(format!(
                        "{ROOT}/cgroup.controllers (cgroup v2) lacks {}: {:?}",
                        missing.join(", "),
                        controllers.trim()
                    )));
                }
                let text = if parent.is_none() {
                    self_cgroup()?
                } else {
                    String::new()
                };
                let rel = rel_of(&text, Version::V2, "")?;
                let dir = make_parent(root, &rel, Version::V2)?;
                return Ok(Hierarchy {
                    version: Version::V2,
                    parents: vec![dir],
                });
            }
            // v1: one hierarchy per controller, each with the agent's own path.
            let mut mounts: Vec<(PathBuf, &str)> = Vec::new();
            let mut missing = Vec::new();
            for c in CONTROLLERS {
                let (root_probe, _) = v1_probes(c);
                let mount = root.join(c);
                if !mount.join(root_probe).is_file() {
                    missing.push(format!("{}/{root_probe}", mount.display()));
                    continue;
                }
                // `cpu` is often a link to `cpu,cpuacct`; two controllers mounted
                // together are one hierarchy, so one directory.
                let real = std::fs::canonicalize(&mount)
                    .map_err(|e| unavailable(format!("{}: {e}", mount.display())))?;
                if !mounts.iter().any(|(m, _)| *m == real) {
                    mounts.push((real, c));
                }
            }
            if !missing.is_empty() {
                return Err(unavailable(format!(
                    "{ROOT}/cgroup.controllers (cgroup v2) does not list memory, and the cgroup v1 hierarchies lack {}",
                    missing.join(", ")
                )));
            }
            let text = if parent.is_none() {
                self_cgroup()?
            } else {
                String::new()
            };
            let mut parents = Vec::new();
            for (mount, c) in mounts {
                let rel = rel_of(&text, Version::V1, c)?;
                parents.push(make_parent(&mount, &rel, Version::V1)?);
            }
            for c in CONTROLLERS {
                let (_, probe) = v1_probes(c);
                if !parents.iter().any(|p| p.join(probe).is_file()) {
                    return Err(unavailable(format!(
                        "no {probe} in {}",
                        parents
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
            Ok(Hierarchy {
                version: Version::V1,
                parents,
            })
        }

        /// v1 or v2.
        pub fn version(&self) -> Version {
            self.version
        }

        /// The parent directory of the per-instance groups (v1: in the memory
        /// hierarchy).
        pub fn parent(&self) -> &Path {
            &self.parents[0]
        }

        /// The parent directory in every hierarchy (v2: one; v1: memory, pids, cpu).
        pub fn parents(&self) -> &[PathBuf] {
            &self.parents
        }

        /// The group of an instance (not created).
        pub fn group(&self, name: &str) -> Group {
            Group {
                dirs: self.parents.iter().map(|p| p.join(name)).collect(),
            }
        }

        /// Creates (or reuses) the group `name` with `limits`: memory without swap,
        /// tasks, CPU weight. Any limit that cannot be set fails the whole call, naming
        /// the file (the caller removes the group). The caller has recorded every
        /// directory of [`Hierarchy::group`] in the ledger first.
        pub fn create(&self, name: &str, limits: &Limits) -> Result<Group, CgroupError> {
            let g = self.group(name);
            for dir in &g.dirs {
                match std::fs::create_dir(dir) {
                    Ok(()) => {}
                    // An instance id like `memory.max` names a control file of the
                    // parent, not a group: reusing it would leave the VMM without a
                    // limit.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        if !std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
                            return Err(CgroupError::Format {
                                path: dir.display().to_string(),
                                what: format!(
                                    "the name {name:?} is a control file of the parent, not a group"
                                ),
                            });
                        }
                    }
                    Err(e) => return Err(io(dir, "mkdir")(e)),
                }
            }
            let memory = limits.memory.to_string();
            match self.version {
                Version::V2 => {
                    write(&g.control("memory.max")?, &memory)?;
                    if let Some(swap) = g.file("memory.swap.max") {
                        write(&swap, "0")?;
                    }
                    // One OOM kill takes the whole VMM (QEMU and its vhost daemon).
                    if let Some(f) = g.file("memory.oom.group") {
                        let _ = std::fs::write(f, "1");
                    }
                    write(&g.control("pids.max")?, &limits.pids.to_string())?;
                    let weight = limits.cpu_weight.clamp(1, 10_000);
                    write(&g.control("cpu.weight")?, &weight.to_string())?;
                }
                Version::V1 => {
                    // memsw (memory + swap) must stay >= the memory limit: order the two
                    // writes so that holds whether the limit grows or shrinks.
                    let mem = g.control("memory.limit_in_bytes")?;
                    match g.file("memory.memsw.limit_in_bytes") {
                        None => write(&mem, &memory)?,
                        Some(memsw) => {
                            if write(&mem, &memory).is_ok() {
                                write(&memsw, &memory)?;
                            } else {
                                write(&memsw, &memory)?;
                                write(&mem, &memory)?;
                            }
                        }
                    }
                    write(&g.control("pids.max")?, &limits.pids.to_string())?;
                    let shares = shares_of_weight(limits.cpu_weight);
                    write(&g.control("cpu.shares")?, &shares.to_string())?;
                }
            }
            Ok(g)
        }

        /// Names of the groups under the parent (in any hierarchy).
        pub fn children(&self) -> Vec<String> {
            let mut names: Vec<String> = self
                .parents
                .iter()
                .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            names.sort();
            names.dedup();
            names
        }

        /// A hierarchy over the given parents (fake directories in unit tests).
        #[cfg(test)]
        pub(crate) fn with_parents(version: Version, parents: Vec<PathBuf>) -> Hierarchy {
            Hierarchy { version, parents }
        }

        /// A parent of a test's own: `<each parent>/<name>`, created (v2: with the
        /// controllers delegated), so no agent's start-up sweep meets its groups.
        #[cfg(test)]
        pub(crate) fn nested(&self, name: &str) -> Result<Hierarchy, CgroupError> {
            let mut parents = Vec::new();
            for p in &self.parents {
                parents.push(make_parent(p, name, self.version)?);
            }
            Ok(Hierarchy {
                version: self.version,
                parents,
            })
        }
    }

    /// Creates `<mount>/<rel>` component by component (on v2 delegating the
    /// controllers from the root down to it) and returns it.
    fn make_parent(mount: &Path, rel: &str, version: Version) -> Result<PathBuf, CgroupError> {
        let mut dir = mount.to_path_buf();
        let components: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
        for (i, c) in components.iter().enumerate() {
            if version == Version::V2 {
                enable_controllers(&dir)?;
            }
            dir.push(c);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(CgroupError::Unavailable(format!(
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
            enable_controllers(&dir)?;
        }
        Ok(dir)
    }

    /// Adds what is missing of `+memory +pids +cpu` to `dir/cgroup.subtree_control`
    /// (v2).
    fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
        let control = dir.join("cgroup.subtree_control");
        let now = std::fs::read_to_string(&control)
            .map_err(|e| CgroupError::Unavailable(format!("{}: {e}", control.display())))?;
        let Some(update) = subtree_control_update(&now) else {
            return Ok(());
        };
        std::fs::write(&control, &update).map_err(|e| {
            CgroupError::Unavailable(format!(
                "write {update:?} to {}: {e} (a group with processes of its own cannot delegate controllers; set runtime.qemu.cgroup_parent to a group outside the agent's)",
                control.display()
            ))
        })
    }

    /// One per-instance group: one directory on v2, one per hierarchy on v1.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Group {
        /// The memory (or unified) directory first.
        dirs: Vec<PathBuf>,
    }

    impl Group {
        /// The group at `path` (one directory).
        pub fn at(path: impl Into<PathBuf>) -> Group {
            Group {
                dirs: vec![path.into()],
            }
        }

        /// The group made of `dirs` (e.g. the ledger rows of one instance), the one with
        /// the memory controller first.
        pub fn of(dirs: Vec<PathBuf>) -> Group {
            let mut dirs = dirs;
            let memory = |d: &PathBuf| {
                d.join("memory.events").exists() || d.join("memory.oom_control").exists()
            };
            dirs.sort_by_key(|d| !memory(d));
            Group { dirs }
        }

        /// Its directory (v1: in the memory hierarchy).
        pub fn path(&self) -> &Path {
            &self.dirs[0]
        }

        /// Its directories (v2: one; v1: one per hierarchy, memory first).
        pub fn dirs(&self) -> &[PathBuf] {
            &self.dirs
        }

        /// The first of its directories that has the control file `name`.
        pub fn file(&self, name: &str) -> Option<PathBuf> {
            self.dirs.iter().map(|d| d.join(name)).find(|f| f.is_file())
        }

        /// [`Group::file`], or an error naming the file when no directory has it.
        fn control(&self, name: &str) -> Result<PathBuf, CgroupError> {
            self.file(name).ok_or_else(|| CgroupError::Format {
                path: self.path().join(name).display().to_string(),
                what: format!("no {name} in any directory of the group (controller missing)"),
            })
        }

        /// The number in control file `name` (`None` when absent, unreadable or not a
        /// number, e.g. `max`).
        pub fn number(&self, name: &str) -> Option<u64> {
            std::fs::read_to_string(self.file(name)?)
                .ok()?
                .trim()
                .parse()
                .ok()
        }

        fn is_v2(&self) -> bool {
            self.file("memory.events").is_some()
        }

        /// Opens `cgroup.procs` of every directory for [`Entry::join`]; call before
        /// forking.
        pub fn entry(&self) -> Result<Entry, CgroupError> {
            let mut fds = Vec::with_capacity(self.dirs.len());
            for d in &self.dirs {
                let p = d.join("cgroup.procs");
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(io(&p, "open"))?;
                fds.push(OwnedFd::from(f));
            }
            Ok(Entry(fds))
        }

        /// How many processes the kernel has OOM-killed in this group.
        pub fn oom_kills(&self) -> Result<u64, CgroupError> {
            let p = self.control(if self.is_v2() {
                "memory.events"
            } else {
                "memory.oom_control"
            })?;
            let text = std::fs::read_to_string(&p).map_err(io(&p, "read"))?;
            parse_oom_kills(&text).ok_or_else(|| CgroupError::Format {
                path: p.display().to_string(),
                what: "no oom_kill line".into(),
            })
        }

        /// The memory limit in bytes.
        pub fn limit(&self) -> Option<u64> {
            self.number(if self.is_v2() {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            })
        }

        /// The highest memory use seen (v1 `memory.max_usage_in_bytes`, v2
        /// `memory.peak` where the kernel has it).
        pub fn peak(&self) -> Option<u64> {
            self.number(if self.is_v2() {
                "memory.peak"
            } else {
                "memory.max_usage_in_bytes"
            })
        }

        /// Processes in the group (in any of its directories).
        pub fn pids(&self) -> Vec<u32> {
            super::procs_of(&self.dirs)
        }

        /// Removes every directory of the group, retrying while its processes drain
        /// (the caller has stopped them), up to `within`. A directory that is already
        /// gone is fine.
        pub async fn remove(&self, within: Duration) -> Result<(), CgroupError> {
            let start = tokio::time::Instant::now();
            for dir in &self.dirs {
                loop {
                    match std::fs::remove_dir(dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                        Err(e)
                            if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) =>
                        {
                            if start.elapsed() >= within {
                                return Err(CgroupError::Busy {
                                    path: dir.display().to_string(),
                                    pids: self.pids(),
                                    waited_ms: start.elapsed().as_millis() as u64,
                                });
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => return Err(io(dir, "rmdir")(e)),
                    }
                }
            }
            Ok(())
        }
    }

    /// The open `cgroup.procs` of every directory of a group, for placing a child
    /// before it runs.
    #[derive(Debug)]
    pub struct Entry(Vec<OwnedFd>);

    impl Entry {
        /// A second handle on the same files (for a second process).
        pub fn try_clone(&self) -> std::io::Result<Entry> {
            self.0
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()
                .map(Entry)
        }

        /// How many `cgroup.procs` it writes (one per directory of the group).
        #[cfg(test)]
        pub(crate) fn descriptors(&self) -> usize {
            self.0.len()
        }

        /// Moves the calling process into the group: every directory (on v1 memory,
        /// pids and cpu), so it is limited by all three before it runs. Meant for
        /// `pre_exec`: one `write(2)` of a static buffer per descriptor opened before
        /// the fork, which is async-signal-safe; iterating the descriptors allocates
        /// nothing. Stops at the first failure (the spawn then fails).
        pub fn join(&self) -> std::io::Result<()> {
            for fd in &self.0 {
                rustix::io::write(fd, b"0").map_err(std::io::Error::from)?;
            }
            Ok(())
        }
    }
}

/// Real cgroups for system tests: a parent of the test's own in every hierarchy.
#[cfg(all(test, target_os = "linux"))]
pub(crate) mod testing {
    use super::Hierarchy;

    /// `<agent's default parent>/<tag>-<pid>` in every hierarchy; its directories are
    /// removed on drop, after the test removed its groups. The default parent stays
    /// (tests running in parallel create theirs below it; the agent makes it anyway).
    pub(crate) struct TestParent {
        /// The hierarchy whose parents are the test's own.
        pub(crate) h: Hierarchy,
    }

    impl TestParent {
        /// Needs root and usable memory, pids and cpu controllers: without them it
        /// skips (returns `None`), or fails when `PLFM_REQUIRE_SYSTEM_TESTS=1`.
        pub(crate) fn new(tag: &str) -> Option<TestParent> {
            let skip = |what: String| crate::testing::gate::skip_or_fail(&what);
            if !rustix::process::geteuid().is_root() {
                skip("root (cgroups)".into());
                return None;
            }
            let probe = match Hierarchy::detect(None) {
                Ok(h) => h,
                Err(e) => {
                    skip(e.to_string());
                    return None;
                }
            };
            let h = probe
                .nested(&format!("{tag}-{}", std::process::id()))
                .expect("a test parent below the default parent");
            Some(TestParent { h })
        }
    }

    impl Drop for TestParent {
        fn drop(&mut self) {
            for p in self.h.parents() {
                let _ = std::fs::remove_dir(p);
            }
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
        assert!(lists("cpuset cpu io memory", "cpu"));
        assert!(!lists("cpuset io memory", "cpu"), "cpuset is not cpu");
    }

    #[test]
    fn own_cgroup_of_each_v1_controller_is_its_own_line() {
        assert_eq!(
            own_cgroup_of(V1_HYBRID, Version::V1, "pids").as_deref(),
            Some("/")
        );
        assert_eq!(
            own_cgroup_of(V1_HYBRID, Version::V1, "cpu").as_deref(),
            Some("/")
        );
        // Mounted together with cpuacct.
        assert_eq!(
            own_cgroup_of(V1_JOINED, Version::V1, "cpu").as_deref(),
            Some("/x")
        );
        assert_eq!(own_cgroup_of(V1_JOINED, Version::V1, "pids"), None);
        // v2 has one line for every controller.
        assert_eq!(
            own_cgroup_of(V2, Version::V2, "pids").as_deref(),
            Some("/system.slice/plfm-node-agent.service")
        );
    }

    #[test]
    fn v2_subtree_control_gets_only_the_missing_controllers() {
        assert_eq!(
            missing_controllers("cpuset cpu io memory hugetlb pids\n"),
            Vec::<&str>::new()
        );
        assert_eq!(missing_controllers("cpuset io memory\n"), ["pids", "cpu"]);
        assert_eq!(subtree_control_update("cpu io memory pids\n"), None);
        assert_eq!(
            subtree_control_update("memory\n").as_deref(),
            Some("+pids +cpu")
        );
        assert_eq!(
            subtree_control_update("").as_deref(),
            Some("+memory +pids +cpu")
        );
        // `cpuset` does not delegate `cpu`.
        assert_eq!(
            subtree_control_update("cpuset memory pids").as_deref(),
            Some("+cpu")
        );
    }

    #[test]
    fn weights_map_to_shares_linearly_within_bounds() {
        assert_eq!(shares_of_weight(100), 1024);
        assert_eq!(shares_of_weight(1), 10);
        assert_eq!(shares_of_weight(10_000), 102_400);
        assert_eq!(shares_of_weight(0), 10);
        assert_eq!(shares_of_weight(u32::MAX), 102_400);
    }

    /// Fake group directories: the control files a kernel would make, empty.
    #[cfg(target_os = "linux")]
    fn fake_group(parent: &std::path::Path, name: &str, files: &[&str]) {
        let d = parent.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in files {
            std::fs::write(d.join(f), "").unwrap();
        }
    }

    #[cfg(target_os = "linux")]
    fn read(path: std::path::PathBuf) -> String {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    const LIMITS: Limits = Limits {
        memory: 256 << 20,
        pids: VMM_PIDS_MAX,
        cpu_weight: 150,
    };

    #[cfg(target_os = "linux")]
    #[test]
    fn a_v2_group_gets_memory_pids_and_cpu_weight_and_fails_closed_without_one() {
        let d = tempfile::tempdir().unwrap();
        let v2_files = [
            "cgroup.procs",
            "memory.events",
            "memory.max",
            "memory.swap.max",
            "pids.max",
            "cpu.weight",
        ];
        fake_group(d.path(), "i-1", &v2_files);
        let h = Hierarchy::with_parents(Version::V2, vec![d.path().to_path_buf()]);
        let g = h.create("i-1", &LIMITS).unwrap();
        assert_eq!(g.dirs(), [d.path().join("i-1")]);
        assert_eq!(
            read(g.path().join("memory.max")),
            (256u64 << 20).to_string()
        );
        assert_eq!(read(g.path().join("memory.swap.max")), "0");
        assert_eq!(read(g.path().join("pids.max")), "1024");
        assert_eq!(read(g.path().join("cpu.weight")), "150");
        assert_eq!(g.number("pids.max"), Some(VMM_PIDS_MAX));
        assert_eq!(
            g.entry().unwrap().descriptors(),
            1,
            "one cgroup.procs to join"
        );
        // A host whose groups have no cpu controller: the start fails, naming the file.
        let no_cpu: Vec<&str> = v2_files
            .into_iter()
            .filter(|f| *f != "cpu.weight")
            .collect();
        fake_group(d.path(), "i-2", &no_cpu);
        let e = h.create("i-2", &LIMITS).unwrap_err().to_string();
        assert!(e.contains("i-2/cpu.weight"), "{e}");
        let no_pids: Vec<&str> = v2_files.into_iter().filter(|f| *f != "pids.max").collect();
        fake_group(d.path(), "i-3", &no_pids);
        let e = h.create("i-3", &LIMITS).unwrap_err().to_string();
        assert!(e.contains("i-3/pids.max"), "{e}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_v1_group_is_one_directory_per_hierarchy_with_shares_of_the_weight() {
        let d = tempfile::tempdir().unwrap();
        let parents: Vec<_> = ["memory", "pids", "cpu"]
            .iter()
            .map(|c| d.path().join(c).join("plfm"))
            .collect();
        fake_group(
            &parents[0],
            "i-1",
            &[
                "cgroup.procs",
                "memory.oom_control",
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
            ],
        );
        fake_group(&parents[1], "i-1", &["cgroup.procs", "pids.max"]);
        fake_group(&parents[2], "i-1", &["cgroup.procs", "cpu.shares"]);
        let h = Hierarchy::with_parents(Version::V1, parents.clone());
        let g = h.create("i-1", &LIMITS).unwrap();
        let dirs: Vec<_> = parents.iter().map(|p| p.join("i-1")).collect();
        assert_eq!(g.dirs(), dirs);
        assert_eq!(g.path(), dirs[0], "named by its memory directory");
        assert_eq!(
            read(dirs[0].join("memory.limit_in_bytes")),
            (256u64 << 20).to_string()
        );
        assert_eq!(
            read(dirs[0].join("memory.memsw.limit_in_bytes")),
            (256u64 << 20).to_string()
        );
        assert_eq!(read(dirs[1].join("pids.max")), "1024");
        assert_eq!(
            read(dirs[2].join("cpu.shares")),
            shares_of_weight(150).to_string()
        );
        assert_eq!(
            g.entry().unwrap().descriptors(),
            3,
            "every hierarchy is joined"
        );
        assert_eq!(h.children(), ["i-1"]);
        // From the ledger rows, in any order: the memory directory names the group.
        let adopted = Group::of(vec![dirs[2].clone(), dirs[0].clone(), dirs[1].clone()]);
        assert_eq!(adopted.path(), dirs[0]);
        assert_eq!(adopted.number("pids.max"), Some(1024));
        // A pids hierarchy without the group's directory fails the start, naming it.
        let h2 = Hierarchy::with_parents(Version::V1, vec![parents[0].clone(), parents[2].clone()]);
        let e = h2.create("i-1", &LIMITS).unwrap_err().to_string();
        assert!(e.contains("pids.max"), "{e}");
    }

    #[test]
    fn qemu_cgroup_keys_parse_default_and_are_validated_with_their_names() {
        use crate::runtime::qemu::QemuConfig;
        let base = "kernel = \"/k\"\ninitramfs = \"/i\"\n";
        let parse = |extra: &str| toml::from_str::<QemuConfig>(&format!("{base}{extra}"));
        let c = parse("").unwrap();
        assert_eq!(c.cgroup, CgroupMode::Required);
        assert_eq!(
            parse("cgroup = \"auto\"\n").unwrap().cgroup,
            CgroupMode::Auto
        );
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

    /// The kernel's count of forks this group refused at its `pids.max` (`max N` in
    /// `pids.events`, v1 and v2).
    #[cfg(target_os = "linux")]
    fn refused_forks(g: &Group) -> Option<u64> {
        let text = std::fs::read_to_string(g.file("pids.events")?).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("max ")?.trim().parse().ok())
    }

    /// SIGKILLs what is in `g` and removes it (waits with a deadline).
    #[cfg(target_os = "linux")]
    async fn kill_and_remove(g: &Group) {
        for pid in g.pids() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        g.remove(std::time::Duration::from_secs(10)).await.unwrap();
    }

    /// Attack: a process placed in an instance group (as a VMM is, with `Entry::join`
    /// before exec) forks 40 children under a limit of 16 tasks. The kernel refuses
    /// the forks past the limit (EAGAIN, counted as `max` in `pids.events`): the shell
    /// never finishes its loop (dash says it cannot fork and exits), and the group never
    /// holds more than 16 tasks. Needs root and usable memory, pids and cpu cgroups.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_vmm_forking_past_its_pids_limit_is_refused() {
        use crate::runtime::vmm::process::spawn_detached;
        use std::path::Path;
        use std::time::Duration;
        let Some(t) = testing::TestParent::new("pids") else {
            return;
        };
        let limits = Limits { pids: 16, ..LIMITS };
        let g = t.h.create("fork-unit", &limits).unwrap();
        let pids_max = g.number("pids.max");
        let entry = g.entry().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let script = "i=0; while [ $i -lt 40 ]; do sleep 60 & i=$((i+1)); done; echo all 40 forked";
        let mut sh = spawn_detached(
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &log,
            Some(&entry),
        )
        .unwrap()
        .child;
        // Until the shell ends (dash exits at its first failed fork; without a limit it
        // finishes the loop) or the kernel has refused a fork (a shell that retries,
        // like bash, keeps going): whichever comes first, within 60 s.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = sh.try_wait().unwrap() {
                break Some(st);
            }
            if refused_forks(&g).is_some_and(|n| n >= 1) {
                break None;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the forking shell neither ended nor was refused a fork within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        let tasks = g.number("pids.current");
        let peak = g.number("pids.peak");
        let refused = refused_forks(&g);
        kill_and_remove(&g).await;
        let _ = sh.wait().await;
        assert!(
            !out.contains("all 40 forked"),
            "40 forks past a limit of 16 succeeded ({status:?}): {out}"
        );
        if status.is_some() {
            assert!(
                out.contains("fork"),
                "the shell names the failed fork: {out}"
            );
        }
        assert!(refused.is_some_and(|n| n >= 1), "pids.events: {refused:?}");
        assert!(tasks.is_some_and(|n| n <= 16), "pids.current {tasks:?}");
        if let Some(peak) = peak {
            assert!(peak <= 16, "pids.peak {peak}");
        }
        assert_eq!(pids_max, Some(16));
        assert!(!g.path().exists());
    }

    /// The group's CPU weight is the given one (v2 `cpu.weight`, v1 `cpu.shares` of
    /// it) and a process placed with `Entry::join` is in the group's cpu (and pids)
    /// cgroup, per `/proc/<pid>/cgroup`. Needs root and usable cgroups.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_vmm_runs_in_its_groups_cpu_weight_and_pids_limit() {
        use crate::runtime::vmm::process::spawn_detached;
        use std::path::{Path, PathBuf};
        let Some(t) = testing::TestParent::new("cpu") else {
            return;
        };
        let limits = Limits {
            cpu_weight: 250,
            ..LIMITS
        };
        let g = t.h.create("cpu-unit", &limits).unwrap();
        let v2 = t.h.version() == Version::V2;
        let cpu_file = if v2 { "cpu.weight" } else { "cpu.shares" };
        let (cpu, pids_max) = (g.number(cpu_file), g.number("pids.max"));
        let entry = g.entry().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut sleeper = spawn_detached(
            Path::new("/bin/sleep"),
            &["60".into()],
            &dir.path().join("out.log"),
            Some(&entry),
        )
        .unwrap()
        .child;
        let pid = sleeper.id().unwrap();
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        // The directory of `controller`'s cgroup of the process.
        let dir_of = |controller: &str| -> Option<PathBuf> {
            if v2 {
                let rel = own_cgroup_of(&text, Version::V2, controller)?;
                return Some(Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/')));
            }
            let rel = own_cgroup_of(&text, Version::V1, controller)?;
            let mount = std::fs::canonicalize(format!("/sys/fs/cgroup/{controller}")).ok()?;
            Some(mount.join(rel.trim_start_matches('/')))
        };
        let cpu_dir = g.file(cpu_file);
        let pids_dir = g.file("pids.max");
        let (in_cpu, in_pids) = (dir_of("cpu"), dir_of("pids"));
        sleeper.start_kill().unwrap();
        sleeper.wait().await.unwrap();
        drop(entry);
        kill_and_remove(&g).await;
        let want = if v2 { 250 } else { shares_of_weight(250) };
        assert_eq!(cpu, Some(want), "{cpu_file}");
        assert_eq!(shares_of_weight(250), 2560);
        assert_eq!(pids_max, Some(VMM_PIDS_MAX));
        assert_eq!(
            in_cpu,
            cpu_dir.and_then(|f| f.parent().map(Path::to_path_buf)),
            "{text}"
        );
        assert_eq!(
            in_pids,
            pids_dir.and_then(|f| f.parent().map(Path::to_path_buf)),
            "{text}"
        );
    }
}
