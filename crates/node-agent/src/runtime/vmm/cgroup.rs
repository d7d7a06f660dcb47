//! The host memory cgroup of each VM's VMM processes, for every runtime that places
//! them itself (qemu; Firecracker without the jailer, whose own `--cgroup` arguments
//! do the same job): the group is a ledger row before it exists, the VMM joins it
//! before its first instruction ([`crate::cgroup::Entry::join`] in the spawn), a host
//! OOM kill in it is `oom_killed`, and it is removed with the instance. Groups under
//! the parent that no adopted VM runs in are removed at start-up, after killing any
//! process left in them (a VMM spawned but never recorded).
//!
//! What it must not do: kill a recorded VMM (the runtime stops VMMs through their own
//! controls), or touch groups outside its parent ([`crate::cgroup`] owns the hierarchy
//! rules). Needs root; without usable cgroups it warns once and VMMs run unconfined.

use std::path::PathBuf;
use std::time::Duration;

use super::ledger::Ledger;
use crate::cgroup::{CgroupMode, Entry, Group, Hierarchy};
use crate::runtime::RuntimeError;
use crate::spec::InstanceId;
use crate::state::ResourceRow;

/// Ledger kind of an instance's host memory cgroup (name: its directory).
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

/// The per-instance memory cgroups of one runtime's VMMs.
pub struct VmmCgroups {
    hierarchy: Option<Hierarchy>,
}

impl VmmCgroups {
    /// Finds a usable memory hierarchy (`mode = auto`), with the groups under `parent`
    /// (default `<agent's own group>/plfm`); warns and returns none without.
    pub fn detect(mode: CgroupMode, parent: Option<&str>) -> VmmCgroups {
        let hierarchy = match mode {
            CgroupMode::Off => None,
            CgroupMode::Auto => match Hierarchy::detect(parent) {
                Ok(h) => {
                    tracing::info!(version = ?h.version(), parent = %h.parent().display(), "VMM processes run in per-instance memory cgroups");
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "VMM processes run without host memory cgroups");
                    None
                }
            },
        };
        VmmCgroups { hierarchy }
    }

    /// No cgroups (Firecracker under the jailer, which makes its own).
    pub fn none() -> VmmCgroups {
        VmmCgroups { hierarchy: None }
    }

    /// Whether groups are made.
    pub fn enabled(&self) -> bool {
        self.hierarchy.is_some()
    }

    /// The parent directory of the groups, when enabled.
    pub fn parent(&self) -> Option<PathBuf> {
        self.hierarchy.as_ref().map(|h| h.parent().to_path_buf())
    }

    /// Creates instance `id`'s group with `limit` bytes, recorded in the ledger first;
    /// kills what a crashed agent left in it. `None` when groups are off or unusable on
    /// this host (warned once at start). A group that cannot be made for this instance
    /// fails the start (fail closed: the VMM never runs without the limit it was
    /// meant to have).
    pub async fn create(
        &self,
        ledger: &Ledger,
        id: &InstanceId,
        limit: u64,
    ) -> Result<Option<(OomWatch, Entry)>, RuntimeError> {
        let Some(h) = &self.hierarchy else {
            return Ok(None);
        };
        let path = h.group(id.as_str()).path().display().to_string();
        ledger.add(KIND_CGROUP, &path, id, None).await?;
        let made = h.create(id.as_str(), limit).and_then(|g| {
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

    /// The group an adopted VM of `id` runs in (from the ledger), OOM kills counted
    /// from now.
    pub fn adopt(rows: &[ResourceRow], id: &InstanceId) -> Option<OomWatch> {
        let group = rows
            .iter()
            .find(|r| r.kind == KIND_CGROUP && r.instance_id == id.as_str())
            .map(|r| Group::at(&r.name))
            .filter(|g| g.path().is_dir())?;
        Some(OomWatch {
            baseline: group.oom_kills().unwrap_or(0),
            limit: group.limit().unwrap_or(0),
            group,
        })
    }

    /// Removes instance `id`'s group (after killing what is left in it: its recorded
    /// processes are gone by now) and its ledger row.
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

    /// At start-up: removes the groups under the parent that none of `live` (the
    /// adopted VMs' groups) is.
    pub async fn remove_orphans(&self, live: &[PathBuf]) {
        let Some(h) = &self.hierarchy else { return };
        let mut removed = Vec::new();
        for name in h.children() {
            let g = h.group(&name);
            if live.iter().any(|p| p == g.path()) {
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
