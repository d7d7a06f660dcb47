//! The control plane as a secrets source: one `GET …/secrets/{version_id}` per fetch.
//! Retries are [`crate::secrets::RetryingSecrets`]'s, on the injected clock; the agent
//! wraps this source in it (see [`http_secrets`]).
//!
//! This module must not retry, cache or log material.

use std::sync::Arc;

use async_trait::async_trait;

use crate::clock::SharedClock;
use crate::control_plane::http::ControlPlaneClient;
use crate::secrets::{RetryingSecrets, SecretMaterial, SecretsError, SecretsSource};

#[async_trait]
impl SecretsSource for ControlPlaneClient {
    async fn fetch(&self, version_id: &str) -> Result<SecretMaterial, SecretsError> {
        self.get_secret(version_id).await
    }
}

/// Connected mode's secrets: the control plane through `client`, transient failures
/// retried on `clock`.
pub fn http_secrets(client: Arc<ControlPlaneClient>, clock: SharedClock) -> RetryingSecrets {
    RetryingSecrets::new(client, clock)
}
