//! What the overlay owner last saw, shared with its readers: the local API
//! (`GET /v1/overlay`, `plfm-node-agent overlay`, `status`), the heartbeat's `overlay`
//! extra (DESIGN §3) and the `plfm_overlay_*` gauges, which are computed from it at each
//! scrape ([`OverlayCollector`]).
//!
//! The owner ([`super::owner`]) replaces the snapshot after every apply and drift check;
//! readers never block it. Nothing here holds or shows the private key: only the public
//! one.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde::{Deserialize, Serialize};

use super::config::RefusedPeer;

/// Whether the overlay runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverlayState {
    /// `[overlay] enabled = false`: the agent does not touch any interface.
    Disabled,
    /// No overlay configuration (none yet, no `overlay.json`, or the control plane has
    /// no overlay service): no interface.
    Off,
    /// A configuration is applied (or being retried: see `last_apply_error`).
    On,
}

/// One peer as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSnapshot {
    /// The peer node's id (from the configuration).
    pub node_id: String,
    /// Its public key (base64).
    pub public_key: String,
    /// Its endpoint (the configured one, or where it last sent from).
    pub endpoint: Option<String>,
    /// Its allowed IPs.
    pub allowed_ips: Vec<String>,
    /// Seconds since the epoch of its last handshake (0: never).
    pub last_handshake_unix: u64,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// What the owner last saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// See [`OverlayState`].
    pub state: OverlayState,
    /// The interface.
    pub interface: String,
    /// The backend in use (`userspace`).
    pub backend: String,
    /// The node's WireGuard public key (base64).
    pub public_key: Option<String>,
    /// Listen port of the applied configuration.
    pub listen_port: Option<u16>,
    /// The node's overlay address of the applied configuration.
    pub node_overlay_ipv6: Option<String>,
    /// Generation of the applied configuration.
    pub generation: Option<i64>,
    /// Where the applied configuration came from.
    pub source: Option<String>,
    /// Why the overlay is off.
    pub off_reason: Option<String>,
    /// The peers.
    pub peers: Vec<PeerSnapshot>,
    /// Peers of the configuration that were refused, with the reason.
    pub refused: Vec<RefusedPeer>,
    /// The last apply's error, cleared by the next successful one.
    pub last_apply_error: Option<String>,
    /// The last source problem (control plane unreachable, a document refused whole,
    /// a stale generation), cleared when the source gives a usable document.
    pub last_source_error: Option<String>,
    /// When the device was last checked (RFC 3339).
    pub checked_at: Option<String>,
}

impl Snapshot {
    /// The snapshot before the owner ran.
    pub fn initial(interface: &str, backend: &str, public_key: Option<String>) -> Snapshot {
        Snapshot {
            state: OverlayState::Off,
            interface: interface.to_string(),
            backend: backend.to_string(),
            public_key,
            listen_port: None,
            node_overlay_ipv6: None,
            generation: None,
            source: None,
            off_reason: Some("no overlay configuration yet".into()),
            peers: Vec::new(),
            refused: Vec::new(),
            last_apply_error: None,
            last_source_error: None,
            checked_at: None,
        }
    }
}

/// One peer as `GET /v1/overlay` and `plfm-node-agent overlay --json` show it (DESIGN
/// §8a field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// The peer node's id.
    pub node_id: String,
    /// Its public key (base64).
    pub public_key: String,
    /// Its endpoint.
    pub endpoint: Option<String>,
    /// Its allowed IPs.
    pub allowed_ips: Vec<String>,
    /// Seconds since its last handshake; `null`: never.
    pub last_handshake_age_secs: Option<u64>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// The overlay as `GET /v1/overlay` and `plfm-node-agent overlay --json` show it: the
/// fields of DESIGN §8a, then the owner's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayView {
    /// Interface.
    pub interface: String,
    /// Backend in use.
    pub backend: String,
    /// The node's public key (base64); there from the first start on.
    pub public_key: Option<String>,
    /// Listen port.
    pub listen_port: Option<u16>,
    /// The node's overlay address.
    pub node_overlay_ipv6: Option<String>,
    /// Generation applied.
    pub generation: Option<i64>,
    /// Peers.
    pub peers: Vec<PeerView>,
    /// `disabled`, `off` or `on`.
    pub state: OverlayState,
    /// Where the configuration came from.
    pub source: Option<String>,
    /// Why the overlay is off.
    pub off_reason: Option<String>,
    /// Refused peers (index, node id, reason).
    pub refused: Vec<RefusedPeer>,
    /// The last apply error.
    pub last_apply_error: Option<String>,
    /// The last source problem.
    pub last_source_error: Option<String>,
    /// When the device was last checked.
    pub checked_at: Option<String>,
}

/// The heartbeat's `overlay` extra (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatOverlay {
    /// Peers configured.
    pub peers: usize,
    /// The oldest last handshake among the peers that had one, in seconds; `null`
    /// without any.
    pub last_handshake_max_age_secs: Option<u64>,
    /// Peers that never completed a handshake (an agent extra).
    pub peers_without_handshake: usize,
}

/// The shared snapshot.
#[derive(Debug)]
pub struct OverlayHandle {
    snap: arc_swap::ArcSwap<Snapshot>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl OverlayHandle {
    /// A handle holding `initial`.
    pub fn new(initial: Snapshot) -> Arc<OverlayHandle> {
        Arc::new(OverlayHandle {
            snap: arc_swap::ArcSwap::from_pointee(initial),
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.load_full()
    }

    /// Replaces the snapshot.
    pub fn set(&self, s: Snapshot) {
        self.snap.store(Arc::new(s));
    }

    /// The view with ages relative to now.
    pub fn view(&self) -> OverlayView {
        view_at(&self.snapshot(), now_unix())
    }

    /// The heartbeat extra, ages relative to now.
    pub fn heartbeat(&self) -> HeartbeatOverlay {
        heartbeat_of(&self.view())
    }
}

/// The view of `s` with ages relative to `now` (seconds since the epoch).
pub fn view_at(s: &Snapshot, now: u64) -> OverlayView {
    OverlayView {
        interface: s.interface.clone(),
        backend: s.backend.clone(),
        public_key: s.public_key.clone(),
        listen_port: s.listen_port,
        node_overlay_ipv6: s.node_overlay_ipv6.clone(),
        generation: s.generation,
        peers: s
            .peers
            .iter()
            .map(|p| PeerView {
                node_id: p.node_id.clone(),
                public_key: p.public_key.clone(),
                endpoint: p.endpoint.clone(),
                allowed_ips: p.allowed_ips.clone(),
                last_handshake_age_secs: (p.last_handshake_unix > 0)
                    .then(|| now.saturating_sub(p.last_handshake_unix)),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            })
            .collect(),
        state: s.state,
        source: s.source.clone(),
        off_reason: s.off_reason.clone(),
        refused: s.refused.clone(),
        last_apply_error: s.last_apply_error.clone(),
        last_source_error: s.last_source_error.clone(),
        checked_at: s.checked_at.clone(),
    }
}

/// The heartbeat extra of a view.
pub fn heartbeat_of(v: &OverlayView) -> HeartbeatOverlay {
    HeartbeatOverlay {
        peers: v.peers.len(),
        last_handshake_max_age_secs: v
            .peers
            .iter()
            .filter_map(|p| p.last_handshake_age_secs)
            .max(),
        peers_without_handshake: v
            .peers
            .iter()
            .filter(|p| p.last_handshake_age_secs.is_none())
            .count(),
    }
}

/// Label: a peer (its node id, or the start of its key when it has none).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// The `plfm_overlay_peers` and `plfm_overlay_last_handshake_seconds{peer}` gauges,
/// computed from the snapshot at each scrape (so an age is current, and the metric is
/// served, without samples, before any peer exists).
#[derive(Debug)]
pub struct OverlayCollector(pub Arc<OverlayHandle>);

impl Collector for OverlayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let v = self.0.view();
        let peers = ConstGauge::new(v.peers.len() as i64);
        let e = encoder.encode_descriptor(
            "plfm_overlay_peers",
            "WireGuard peers configured on the overlay interface",
            None,
            MetricType::Gauge,
        )?;
        peers.encode(e)?;
        let mut e = encoder.encode_descriptor(
            "plfm_overlay_last_handshake_seconds",
            "Seconds since the last handshake with each peer (+Inf: never)",
            None,
            MetricType::Gauge,
        )?;
        for p in &v.peers {
            let label = PeerLabel {
                peer: if p.node_id.is_empty() {
                    p.public_key.chars().take(8).collect()
                } else {
                    p.node_id.clone()
                },
            };
            let age = p
                .last_handshake_age_secs
                .map(|a| a as f64)
                .unwrap_or(f64::INFINITY);
            ConstGauge::new(age).encode(e.encode_family(&label)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(node: &str, hs: u64) -> PeerSnapshot {
        PeerSnapshot {
            node_id: node.into(),
            public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            endpoint: None,
            allowed_ips: vec!["fd00::2/128".into()],
            last_handshake_unix: hs,
            rx_bytes: 1,
            tx_bytes: 2,
        }
    }

    #[test]
    fn ages_and_the_heartbeat_extra_come_from_the_handshake_times() {
        let mut s = Snapshot::initial("plfm-wg0", "userspace", Some("pk".into()));
        s.peers = vec![peer("a", 1000), peer("b", 0), peer("c", 990)];
        let v = view_at(&s, 1005);
        assert_eq!(v.peers[0].last_handshake_age_secs, Some(5));
        assert_eq!(v.peers[1].last_handshake_age_secs, None);
        let hb = heartbeat_of(&v);
        assert_eq!(
            (
                hb.peers,
                hb.last_handshake_max_age_secs,
                hb.peers_without_handshake
            ),
            (3, Some(15), 1)
        );
        let json = serde_json::to_value(&v).unwrap();
        for k in [
            "interface",
            "backend",
            "public_key",
            "listen_port",
            "node_overlay_ipv6",
            "generation",
            "peers",
        ] {
            assert!(json.get(k).is_some(), "{k} missing: {json}");
        }
        for k in [
            "node_id",
            "public_key",
            "endpoint",
            "allowed_ips",
            "last_handshake_age_secs",
            "rx_bytes",
            "tx_bytes",
        ] {
            assert!(json["peers"][0].get(k).is_some(), "peer {k} missing");
        }
    }

    #[test]
    fn the_gauges_are_served_before_any_peer_and_then_per_peer() {
        let h = OverlayHandle::new(Snapshot::initial("wg", "userspace", None));
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(OverlayCollector(h.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("# TYPE plfm_overlay_peers gauge"), "{out}");
        assert!(out.contains("plfm_overlay_peers 0"), "{out}");
        assert!(
            out.contains("# TYPE plfm_overlay_last_handshake_seconds gauge"),
            "{out}"
        );
        let mut s = Snapshot::initial("wg", "userspace", None);
        s.peers = vec![peer("node-2", 0)];
        h.set(s);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("plfm_overlay_last_handshake_seconds{peer=\"node-2\"} inf"),
            "{out}"
        );
        assert!(out.contains("plfm_overlay_peers 1"), "{out}");
    }
}
