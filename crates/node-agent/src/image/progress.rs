//! Progress of one image pull and build, as the pipeline reports it and `image pull`
//! shows it: bytes per layer, then unpack, then mkfs.
//!
//! The pipeline writes plain atomics (one `fetch_add` per received chunk, no lock, no
//! channel that could block a download); a viewer polls them. Every state only moves
//! forward, so a viewer that polls now and then still sees each layer and stage end,
//! however short. This module must not do I/O or decide anything about the pull.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Where the pipeline is. Only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Stage {
    /// Waiting for the digest lock (another process builds the same image) or for
    /// the manifest.
    Resolving = 0,
    /// Layers downloading.
    Downloading = 1,
    /// Layers unpacking into a tree.
    Unpacking = 2,
    /// The ext4 root disk being built.
    Mkfs = 3,
    /// Built (or found in the cache).
    Done = 4,
}

impl Stage {
    fn from_u8(v: u8) -> Stage {
        match v {
            0 => Stage::Resolving,
            1 => Stage::Downloading,
            2 => Stage::Unpacking,
            3 => Stage::Mkfs,
            _ => Stage::Done,
        }
    }
}

/// One layer's download.
#[derive(Debug)]
pub struct LayerProgress {
    /// Short digest (`sha256:ab12…`).
    pub digest: String,
    /// Compressed size the manifest gives.
    pub size: u64,
    downloaded: AtomicU64,
    done: AtomicBool,
    cached: AtomicBool,
    unpacked: AtomicBool,
}

impl LayerProgress {
    /// Bytes received so far.
    pub fn downloaded(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }

    /// Downloaded and verified (or already in the blob store).
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Was already in the blob store: nothing downloaded.
    pub fn was_cached(&self) -> bool {
        self.cached.load(Ordering::Relaxed)
    }

    /// Unpacked into its layer disk's tree (layers unpack in parallel, in any order).
    pub fn is_unpacked(&self) -> bool {
        self.unpacked.load(Ordering::Acquire)
    }
}

/// Progress of one pull and build; share it (`Arc`) between the pipeline and a viewer.
#[derive(Debug, Default)]
pub struct PullProgress {
    layers: OnceLock<Vec<LayerProgress>>,
    stage: AtomicU8,
    unpacked: AtomicUsize,
    cache_hit: AtomicBool,
}

impl PullProgress {
    /// A pull that has not started.
    pub fn new() -> PullProgress {
        PullProgress::default()
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        Stage::from_u8(self.stage.load(Ordering::Acquire))
    }

    /// The layers, once the manifest is read.
    pub fn layers(&self) -> &[LayerProgress] {
        self.layers.get().map(Vec::as_slice).unwrap_or(&[])
    }

    /// Layers unpacked so far.
    pub fn unpacked(&self) -> usize {
        self.unpacked.load(Ordering::Acquire)
    }

    /// The root disk was in the cache: nothing was pulled or built.
    pub fn cache_hit(&self) -> bool {
        self.cache_hit.load(Ordering::Acquire)
    }

    pub(crate) fn advance(&self, stage: Stage) {
        self.stage.fetch_max(stage as u8, Ordering::AcqRel);
    }

    pub(crate) fn set_layers(&self, layers: impl IntoIterator<Item = (String, u64)>) {
        let _ = self.layers.set(
            layers
                .into_iter()
                .map(|(digest, size)| LayerProgress {
                    digest,
                    size,
                    downloaded: AtomicU64::new(0),
                    done: AtomicBool::new(false),
                    cached: AtomicBool::new(false),
                    unpacked: AtomicBool::new(false),
                })
                .collect(),
        );
        self.advance(Stage::Downloading);
    }

    pub(crate) fn received(&self, layer: usize, bytes: u64) {
        if let Some(l) = self.layers().get(layer) {
            l.downloaded.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub(crate) fn layer_done(&self, layer: usize, cached: bool) {
        if let Some(l) = self.layers().get(layer) {
            l.cached.store(cached, Ordering::Relaxed);
            l.done.store(true, Ordering::Release);
        }
    }

    /// Layer `index` (bottom-up) is unpacked; counted once.
    pub(crate) fn layer_unpacked(&self, index: usize) {
        if let Some(l) = self.layers().get(index) {
            if !l.unpacked.swap(true, Ordering::AcqRel) {
                self.unpacked.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    pub(crate) fn found_in_cache(&self) {
        self.cache_hit.store(true, Ordering::Release);
        self.advance(Stage::Done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_only_move_forward_and_layers_count_bytes() {
        let p = PullProgress::new();
        assert_eq!(p.stage(), Stage::Resolving);
        p.set_layers([("sha256:aa".to_string(), 10), ("sha256:bb".to_string(), 5)]);
        assert_eq!(p.stage(), Stage::Downloading);
        p.received(0, 4);
        p.received(0, 6);
        p.layer_done(0, false);
        p.layer_done(1, true);
        p.received(7, 1); // unknown layer: ignored
        assert_eq!(p.layers()[0].downloaded(), 10);
        assert!(p.layers()[0].is_done() && p.layers()[1].was_cached());
        p.advance(Stage::Mkfs);
        p.advance(Stage::Unpacking);
        assert_eq!(p.stage(), Stage::Mkfs);
    }
}
