//! Prometheus counters of the image pipeline (DESIGN §10). The service updates them;
//! the agent registers them once into its registry.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// Counters of pulls, builds and the cache. Cheap to clone (shared atomics).
#[derive(Debug, Clone, Default)]
pub struct ImageMetrics {
    /// Compressed bytes downloaded from registries.
    pub pull_bytes: Counter,
    /// Seconds spent pulling (manifest, config and layers).
    pub pull_seconds: Counter<f64, AtomicU64>,
    /// Completed pulls.
    pub pulls: Counter,
    /// Requests served by an already built disk.
    pub cache_hits: Counter,
    /// Requests that needed a pull and build.
    pub cache_misses: Counter,
    /// Root disks evicted.
    pub evictions: Counter,
    /// Seconds spent unpacking and building disks.
    pub build_seconds: Counter<f64, AtomicU64>,
    /// Completed builds.
    pub builds: Counter,
    /// Layer blobs downloaded (a blob already in the blob store is not counted).
    pub layer_downloads: Counter,
    /// Layer disks built (each one unpack of its layers).
    pub layer_builds: Counter,
    /// Layer disks found in the cache for a new image instead of built again.
    pub layer_reuses: Counter,
    /// Layers unpacked on disk because they did not fit the memory staging.
    pub staging_fallbacks: Counter,
    /// Layers unpacked into their disk while they downloaded (no blob stored).
    pub layers_streamed: Counter,
}

impl ImageMetrics {
    /// Registers every counter under the `plfm_image_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("plfm_image");
        r.register(
            "pull_bytes",
            "Compressed bytes downloaded from registries",
            self.pull_bytes.clone(),
        );
        r.register(
            "pull_seconds",
            "Seconds spent pulling images",
            self.pull_seconds.clone(),
        );
        r.register("pulls", "Image pulls completed", self.pulls.clone());
        r.register(
            "cache_hits",
            "Root disk requests served from the cache",
            self.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Root disk requests that needed a pull and build",
            self.cache_misses.clone(),
        );
        r.register(
            "evictions",
            "Root disks evicted from the cache",
            self.evictions.clone(),
        );
        r.register(
            "build_seconds",
            "Seconds spent unpacking layers and building root disks",
            self.build_seconds.clone(),
        );
        r.register("builds", "Root disk builds completed", self.builds.clone());
        r.register(
            "layer_downloads",
            "Layer blobs downloaded",
            self.layer_downloads.clone(),
        );
        r.register(
            "layer_builds",
            "Layer disks built (one unpack each)",
            self.layer_builds.clone(),
        );
        r.register(
            "staging_fallbacks",
            "Layers unpacked on disk because they did not fit the memory staging",
            self.staging_fallbacks.clone(),
        );
        r.register(
            "layer_reuses",
            "Layer disks reused from the cache by a new image",
            self.layer_reuses.clone(),
        );
        r.register(
            "layers_streamed",
            "Layers unpacked into their disk while they downloaded",
            self.layers_streamed.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_in_the_text_exposition() {
        let m = ImageMetrics::default();
        let mut reg = Registry::default();
        m.register(&mut reg);
        m.cache_hits.inc();
        m.pull_seconds.inc_by(1.5);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("plfm_image_cache_hits_total 1"), "{out}");
        assert!(out.contains("plfm_image_pull_seconds_total 1.5"), "{out}");
    }
}
