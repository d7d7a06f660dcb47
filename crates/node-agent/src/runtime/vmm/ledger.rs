//! The resource ledger as the runtimes use it: a row per host resource, written before
//! the resource exists and removed after it is gone (the state store's `resources`
//! table), so a crash at any point leaves a record of what to clean up.
//!
//! This module only reads and writes rows; it creates and removes nothing else.

use crate::runtime::{Cause, RuntimeError};
use crate::spec::InstanceId;
use crate::state::{ResourceRow, Store};

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
}
