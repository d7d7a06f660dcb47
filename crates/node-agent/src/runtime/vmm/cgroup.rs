//! The host cgroup of each VM's VMM processes, for every runtime that places them
//! itself (qemu; Firecracker without the jailer, whose own `--cgroup` arguments do the
//! same job): memory (guest memory + overhead, no swap), tasks ([`VMM_PIDS_MAX`]) and
//! CPU weight ([`super::guest::cpu_weight`]). Each directory of the group (one on
//! cgroup v2, one per hierarchy on v1: memory, pids, cpu) is a ledger row before it
//! exists, the VMM joins all of them before its first instruction
//! ([`crate::cgroup::Entry::join`] in the spawn), a host OOM kill in it is
//! `oom_killed`, and it is removed with the instance. Groups under the parent that no
//! adopted VM runs in are removed at start-up, after killing any process left in them
//! (a VMM spawned but never recorded).
//!
//! What it must not do: kill a recorded VMM (the runtime stops VMMs through their own
//! controls), or touch groups outside its parent ([`crate::cgroup`] owns the hierarchy
//! rules). Needs root; without usable cgroups (or without one of the memory, pids and
//! cpu controllers) it warns once and VMMs run unconfined.

use std::path::PathBuf;
use std::time::Duration;

use super::ledger::Ledger;
use crate::cgroup::{CgroupMode, Entry, Group, Hierarchy, Limits, VMM_PIDS_MAX};
use crate::runtime::RuntimeError;
use crate::spec::InstanceId;
use crate::state::ResourceRow;

/// Ledger kind of an instance's host cgroup: one row per directory (name: the
/// directory; on v1 one each in the memory, pids and cpu hierarchies).
pub const KIND_CGROUP: &str = "cgroup";

/// A VM's host cgroup and its OOM-kill count when the VMM was spawned (or adopted).
pub struct OomWatch {
    group: Group,
    baseline: u64,
    /// Bytes.
    limit: u64,
}

impl OomWatch {
    /// Why the VMM died, when the host cgroup OOM-killed a process since the baseline.
    pub fn killed(&self) -> Option<String> {
        let now = self.group.oom_kills().ok()?;
        (now > self.baseline).then(|| {
            format!(
                "the host cgroup {} OOM-killed the VMM (limit {} MiB: guest memory + the VMM's overhead)",
                self.group.path().display(),
                self.limit >> 20
            )
        })
    }

    /// The group.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// The monitor's check of this group ([`super::monitor::OomCheck`]).
    pub fn into_check(self) -> super::monitor::OomCheck {
        Box::new(move || self.killed())
    }
}

/// The per-instance cgroups (memory, pids, cpu) of one runtime's VMMs.
pub struct VmmCgroups {
    hierarchy: Option<Hierarchy>,
    /// Groups are required and this host cannot have them: why, naming the key.
    missing: Option<String>,
    /// Groups are not made although asked for (`auto` on a host without them): why.
    unconfined: Option<String>,
}

impl VmmCgroups {
    /// Finds usable memory, pids and cpu controllers, with the groups under `parent`
    /// (default `<agent's own group>/plfm`, per hierarchy on v1). On a host lacking any
    /// of the three: with `required` (the default) every [`VmmCgroups::create`] fails,
    /// naming `key`; with `auto` it warns once and VMMs run without host limits.
    pub fn detect(mode: CgroupMode, parent: Option<&str>, key: &'static str) -> VmmCgroups {
        let found = match mode {
            CgroupMode::Off => {
                return VmmCgroups::none();
            }
            CgroupMode::Required | CgroupMode::Auto => Hierarchy::detect(parent),
        };
        match found {
            Ok(h) => {
                tracing::info!(version = ?h.version(), parents = ?h.parents(), pids_max = VMM_PIDS_MAX, "VMM processes run in per-instance cgroups (memory, pids, cpu)");
                VmmCgroups {
                    hierarchy: Some(h),
                    ..VmmCgroups::none()
                }
            }
            Err(e) if mode == CgroupMode::Required => {
                let why = format!(
                    "{e}: VMs are not started without host cgroups ({key} = \"required\"; \"auto\" runs VMMs without memory, pids and cpu limits)"
                );
                tracing::error!(error = %why, "every instance will fail with firecracker_start_failed");
                VmmCgroups {
                    missing: Some(why),
                    ..VmmCgroups::none()
                }
            }
            Err(e) => {
                let why = format!(
                    "{key} = \"auto\": VMM processes run without host cgroups (no memory, pids or cpu limits): {e}"
                );
                tracing::warn!("{why}");
                VmmCgroups {
                    unconfined: Some(why),
                    ..VmmCgroups::none()
                }
            }
        }
    }

    /// No cgroups (Firecracker under the jailer, which makes its own).
    pub fn none() -> VmmCgroups {
        VmmCgroups {
            hierarchy: None,
            missing: None,
            unconfined: None,
        }
    }

    /// Why VMMs run without the host cgroups they were meant to have, if they do.
    pub fn notice(&self) -> Option<String> {
        self.unconfined.clone()
    }

    /// Whether VMMs go through [`VmmCgroups::create`] (groups are made, or required
    /// and impossible, so every start fails there).
    pub fn enabled(&self) -> bool {
        self.hierarchy.is_some() || self.missing.is_some()
    }

    /// The parent directory of the groups, when enabled.
    pub fn parent(&self) -> Option<PathBuf> {
        self.hierarchy.as_ref().map(|h| h.parent().to_path_buf())
    }

    /// Creates instance `id`'s group with `limit` bytes of memory, [`VMM_PIDS_MAX`]
    /// tasks and `cpu_weight` (1..=10000), each directory recorded in the ledger first;
    /// kills what a crashed agent left in it. `None` when groups are off or unusable on
    /// this host (warned once at start). A group that cannot be made for this instance,
    /// or any of its limits that cannot be set, fails the start naming the file (fail
    /// closed: the VMM never runs without the limits it was meant to have).
    pub async fn create(
        &self,
        ledger: &Ledger,
        id: &InstanceId,
        limit: u64,
        cpu_weight: u32,
    ) -> Result<Option<(OomWatch, Entry)>, RuntimeError> {
        if let Some(why) = &self.missing {
            return Err(RuntimeError::VmmStart(why.clone().into()));
        }
        let Some(h) = &self.hierarchy else {
            return Ok(None);
        };
        for dir in h.group(id.as_str()).dirs() {
            ledger
                .add(KIND_CGROUP, &dir.display().to_string(), id, None)
                .await?;
        }
        let limits = Limits {
            memory: limit,
            pids: VMM_PIDS_MAX,
            cpu_weight,
        };
        let made = h.create(id.as_str(), &limits).and_then(|g| {
            let entry = g.entry()?;
            Ok((g, entry))
        });
        match made {
            Ok((group, entry)) => {
                kill_unrecorded(&group);
                let baseline = group.oom_kills().unwrap_or(0);
                Ok(Some((
                    OomWatch {
                        group,
                        baseline,
                        limit,
                    },
                    entry,
                )))
            }
            Err(e) => Err(RuntimeError::VmmStart(crate::runtime::Cause::because(
                format!("host cgroup of instance {id}"),
                e,
            ))),
        }
    }

    /// The group an adopted VM of `id` runs in (every directory the ledger has for
    /// it; one for a group made before pids and cpu limits), OOM kills counted from
    /// now.
    pub fn adopt(rows: &[ResourceRow], id: &InstanceId) -> Option<OomWatch> {
        let dirs: Vec<PathBuf> = rows
            .iter()
            .filter(|r| r.kind == KIND_CGROUP && r.instance_id == id.as_str())
            .map(|r| PathBuf::from(&r.name))
            .filter(|d| d.is_dir())
            .collect();
        if dirs.is_empty() {
            return None;
        }
        let group = Group::of(dirs);
        Some(OomWatch {
            baseline: group.oom_kills().unwrap_or(0),
            limit: group.limit().unwrap_or(0),
            group,
        })
    }

    /// Removes instance `id`'s group, directory by directory (after killing what is
    /// left in it: its recorded processes are gone by now), and its ledger rows.
    pub async fn release(&self, ledger: &Ledger, id: &InstanceId) -> Result<(), RuntimeError> {
        let rows = ledger.rows().await?;
        for r in rows
            .iter()
            .filter(|r| r.kind == KIND_CGROUP && r.instance_id == id.as_str())
        {
            let g = Group::at(&r.name);
            kill_unrecorded(&g);
            g.remove(Duration::from_secs(5))
                .await
                .map_err(|e| RuntimeError::VmmStart(crate::runtime::Cause::of(e)))?;
            ledger.remove(KIND_CGROUP, &r.name).await;
        }
        Ok(())
    }

    /// At start-up: removes the groups under the parent (in every hierarchy) that none
    /// of `live` (a directory of each adopted VM's group) belongs to.
    pub async fn remove_orphans(&self, live: &[PathBuf]) {
        let Some(h) = &self.hierarchy else { return };
        let mut removed = Vec::new();
        for name in h.children() {
            let g = h.group(&name);
            if live.iter().any(|p| g.dirs().contains(p)) {
                continue;
            }
            kill_unrecorded(&g);
            match g.remove(Duration::from_secs(2)).await {
                Ok(()) => removed.push(name),
                Err(e) => tracing::warn!(error = %e, "leftover VMM cgroup not removed"),
            }
        }
        if !removed.is_empty() {
            tracing::info!(?removed, "removed VMM cgroups no running VM uses");
        }
    }
}

/// SIGKILLs what is still in an instance's group: a VMM spawned but not yet recorded
/// when the agent died (only the runtimes place processes there).
fn kill_unrecorded(g: &Group) {
    for pid in g.pids() {
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            tracing::warn!(pid = pid.as_raw_nonzero().get(), cgroup = %g.path().display(), "killing an unrecorded process left in a VMM cgroup");
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that cannot give VMMs their cgroups starts no VM when they are required
    /// (the default): the start fails naming the key, and nothing is recorded.
    #[tokio::test]
    async fn required_cgroups_that_the_host_cannot_give_fail_every_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::state::Store::open(&dir.path().join("state.db")).unwrap();
        let ledger = Ledger(store.clone());
        let cgroups = VmmCgroups::detect(
            CgroupMode::Required,
            Some("/plfm-test-\u{0}-no-such-hierarchy"),
            "runtime.qemu.cgroup",
        );
        assert!(cgroups.enabled(), "a start must go through create and fail");
        let id = InstanceId::parse("i-1").unwrap();
        let err = match cgroups.create(&ledger, &id, 256 << 20, 100).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a VMM would run without its cgroup"),
        };
        assert!(err.contains("runtime.qemu.cgroup = \"required\""), "{err}");
        assert!(store.resources().unwrap().is_empty());
        // `auto` is the explicit opt-out: no group, and the start goes on.
        let auto = VmmCgroups::detect(
            CgroupMode::Auto,
            Some("/plfm-test-\u{0}-no-such-hierarchy"),
            "runtime.qemu.cgroup",
        );
        assert!(!auto.enabled());
        let notice = auto.notice().expect("status says the VMMs run unconfined");
        assert!(
            notice.contains("runtime.qemu.cgroup = \"auto\""),
            "{notice}"
        );
        assert!(auto
            .create(&ledger, &id, 256 << 20, 100)
            .await
            .unwrap()
            .is_none());
    }
}
