//! The resource ledger as the runtimes use it: a row per host resource, written before
//! the resource exists and removed after it is gone (the state store's `resources`
//! table), so a crash at any point leaves a record of what to clean up.
//!
//! This module only reads and writes rows; it creates and removes nothing else.

use std::collections::HashSet;

use crate::runtime::{Cause, RuntimeError};
use crate::spec::InstanceId;
use crate::state::{ResourceRow, Store};

/// Ledger kind of an instance's VMM uid (name: the uid).
pub const KIND_UID: &str = "uid";

/// Serialises uid allocation: two instances reading the rows at once could pick the
/// same free uid.
static UID_ALLOCATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The ledger of one runtime.
#[derive(Clone)]
pub struct Ledger(pub Store);

impl Ledger {
    /// Adds (or replaces) a row; the caller creates the resource only after this.
    pub async fn add(
        &self,
        kind: &str,
        name: &str,
        id: &InstanceId,
        detail: Option<String>,
    ) -> Result<(), RuntimeError> {
        let row = ResourceRow {
            kind: kind.to_string(),
            name: name.to_string(),
            instance_id: id.to_string(),
            detail,
        };
        self.0
            .call(move |s| s.resource_add(&row))
            .await
            .map_err(|e| RuntimeError::VmmStart(Cause::because("resource ledger", e)))
    }

    /// Removes a row (after the resource is gone); a failure is logged.
    pub async fn remove(&self, kind: &str, name: &str) {
        let (k, n) = (kind.to_string(), name.to_string());
        if let Err(e) = self.0.call(move |s| s.resource_remove(&k, &n)).await {
            tracing::warn!(kind, name, error = %e, "cannot remove resource from the ledger");
        }
    }

    /// Every row.
    pub async fn rows(&self) -> Result<Vec<ResourceRow>, RuntimeError> {
        self.0
            .call(|s| s.resources())
            .await
            .map_err(|e| RuntimeError::VmmStart(Cause::because("resource ledger", e)))
    }

    /// Removes every row of instance `id`.
    pub async fn remove_instance(&self, id: &InstanceId) -> Result<(), RuntimeError> {
        for r in self
            .rows()
            .await?
            .into_iter()
            .filter(|r| r.instance_id == id.as_str())
        {
            self.remove(&r.kind, &r.name).await;
        }
        Ok(())
    }

    /// The unprivileged uid of `id`'s VMM processes, from `first..first + count`: the
    /// one it holds, else the first free one from a hash of its id. Recorded before
    /// use, so no two instances share one (their processes could then signal or
    /// ptrace each other, or open each other's files).
    pub async fn allocate_uid(
        &self,
        id: &InstanceId,
        first: u32,
        count: u32,
    ) -> Result<u32, RuntimeError> {
        let _allocating = UID_ALLOCATION.lock().await;
        let rows = self.rows().await?;
        if let Some(uid) = rows
            .iter()
            .find(|r| r.kind == KIND_UID && r.instance_id == id.as_str())
            .and_then(|r| r.name.parse::<u32>().ok())
        {
            return Ok(uid);
        }
        let taken: HashSet<u32> = rows
            .iter()
            .filter(|r| r.kind == KIND_UID)
            .filter_map(|r| r.name.parse().ok())
            .collect();
        let tap = crate::network::tap_name(id.as_str());
        let hex = &tap[crate::network::TAP_PREFIX.len()..crate::network::TAP_PREFIX.len() + 7];
        let start = u32::from_str_radix(hex, 16).unwrap_or(0) % count.max(1);
        let uid = (0..count)
            .map(|k| first + (start + k) % count)
            .find(|u| !taken.contains(u))
            .ok_or_else(|| {
                RuntimeError::VmmStart(
                    format!("all {count} VMM uids from {first} are in use (vmm_uid_count)").into(),
                )
            })?;
        self.add(KIND_UID, &uid.to_string(), id, None).await?;
        Ok(uid)
    }
}
