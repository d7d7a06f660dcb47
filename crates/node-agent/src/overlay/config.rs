//! The overlay configuration as the control plane (or `<desired_dir>/overlay.json` in
//! standalone mode) gives it: the node's listen port, MTU and overlay address, and the
//! WireGuard peers. Parsing refuses a bad peer alone, with a message naming it, and keeps
//! the rest; [`diff`] turns the applied peer set and the wanted one into the changes to
//! make (added, changed, removed), keyed by public key.
//!
//! This module validates and compares; it touches no interface and sends nothing.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Default WireGuard listen port.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// Default overlay MTU.
pub const DEFAULT_MTU: u32 = 1420;
/// Most peers one document may carry (a full mesh of this many nodes).
pub const MAX_PEERS: usize = 4096;
/// Most allowed IPs of one peer (its node address and its instances' /128s).
pub const MAX_ALLOWED_IPS: usize = 4096;

/// A WireGuard public key (32 bytes; shown as standard base64, as `wg` prints it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses standard base64 of exactly 32 bytes.
    pub fn parse(s: &str) -> Result<PublicKey, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| "public_key is not base64".to_string())?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|v: Vec<u8>| format!("public_key has {} bytes, not 32", v.len()))?;
        Ok(PublicKey(key))
    }

    /// Standard base64.
    pub fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// Lower-case hex, as the WireGuard UAPI wants it.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.base64())
    }
}

/// An IPv6 prefix in a peer's `allowed_ips`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// Network address (host bits cleared).
    pub addr: Ipv6Addr,
    /// Prefix length.
    pub len: u8,
}

impl Prefix {
    /// Parses `addr/len` (or a bare address, a /128). IPv6 only: the overlay is IPv6.
    /// A default route (`::/0`) is refused, and so is a prefix shorter than /32: no
    /// peer may take more of the address space than an overlay prefix.
    pub fn parse(s: &str) -> Result<Prefix, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("allowed_ips entry {s:?} is not an IP prefix"))?;
        let IpAddr::V6(addr) = addr else {
            return Err(format!(
                "allowed_ips entry {s:?} is IPv4; the overlay carries IPv6 only"
            ));
        };
        let len: u8 = match l {
            None => 128,
            Some(l) => l
                .parse()
                .ok()
                .filter(|n| *n <= 128)
                .ok_or_else(|| format!("allowed_ips entry {s:?} has a bad prefix length"))?,
        };
        if len < 32 {
            return Err(format!(
                "allowed_ips entry {s:?} is too broad (shorter than /32; never a default route)"
            ));
        }
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        };
        Ok(Prefix {
            addr: Ipv6Addr::from(u128::from(addr) & mask),
            len,
        })
    }

    /// Whether `ip` lies inside.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len))
        };
        u128::from(ip) & mask == u128::from(self.addr)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One validated peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer node's id (for messages and the overlay table).
    pub node_id: String,
    /// Its WireGuard public key.
    pub public_key: PublicKey,
    /// Where it listens (`[v6]:port` or `v4:port`; names are refused, the agent does no
    /// DNS for the data plane).
    pub endpoint: Option<SocketAddr>,
    /// What it may send from and what is routed to it (sorted, deduplicated).
    pub allowed_ips: Vec<Prefix>,
    /// Persistent keepalive in seconds (0 or absent: off).
    pub keepalive_secs: Option<u16>,
}

/// The node's own overlay settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOverlay {
    /// The node's overlay address (on the WireGuard interface).
    pub overlay_ipv6: Ipv6Addr,
    /// UDP listen port.
    pub listen_port: u16,
    /// Interface MTU.
    pub mtu: u32,
}

/// A validated overlay configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    /// Generation (a lower one than the applied one is ignored by the caller).
    pub generation: i64,
    /// This node.
    pub node: NodeOverlay,
    /// Accepted peers, sorted by public key.
    pub peers: Vec<Peer>,
}

#[derive(Deserialize)]
struct RawDoc {
    generation: i64,
    node: RawNode,
    #[serde(default)]
    peers: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawNode {
    overlay_ipv6: String,
    #[serde(default)]
    listen_port: Option<u16>,
    #[serde(default)]
    mtu: Option<u32>,
}

#[derive(Deserialize)]
struct RawPeer {
    node_id: String,
    public_key: String,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    #[serde(default)]
    keepalive_secs: Option<u32>,
}

/// A peer refused alone; the rest of the document applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedPeer {
    /// Its position in `peers`.
    pub index: usize,
    /// Its `node_id` when it had a readable one.
    pub node_id: Option<String>,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for RefusedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.node_id {
            Some(n) => write!(f, "peer {} ({n}): {}", self.index, self.reason),
            None => write!(f, "peer {}: {}", self.index, self.reason),
        }
    }
}

/// Parses and validates an overlay document. `own_key` is this node's public key (a
/// peer with it is refused). The whole document is refused only when it is not an
/// overlay document at all (not JSON, no `generation` or `node`, a bad node address);
/// each bad peer is refused alone and listed.
pub fn parse(
    json: &[u8],
    own_key: Option<&PublicKey>,
) -> Result<(OverlayConfig, Vec<RefusedPeer>), String> {
    let raw: RawDoc = serde_json::from_slice(json).map_err(|e| format!("overlay document: {e}"))?;
    let overlay_ipv6: Ipv6Addr = raw.node.overlay_ipv6.parse().map_err(|_| {
        format!(
            "node.overlay_ipv6 {:?} is not an IPv6 address",
            raw.node.overlay_ipv6
        )
    })?;
    let mtu = raw.node.mtu.unwrap_or(DEFAULT_MTU);
    if !(1280..=9000).contains(&mtu) {
        return Err(format!("node.mtu {mtu} is not in 1280..=9000"));
    }
    let listen_port = raw.node.listen_port.unwrap_or(DEFAULT_LISTEN_PORT);
    if listen_port == 0 {
        return Err("node.listen_port must not be 0".into());
    }
    if raw.peers.len() > MAX_PEERS {
        return Err(format!(
            "{} peers, more than the {MAX_PEERS} one node accepts",
            raw.peers.len()
        ));
    }
    let mut refused = Vec::new();
    let mut peers: BTreeMap<PublicKey, Peer> = BTreeMap::new();
    // Who routes which prefix: WireGuard moves a prefix to the last peer that names it,
    // so a second claim would silently take traffic from the first.
    let mut owner: BTreeMap<Prefix, PublicKey> = BTreeMap::new();
    for (index, value) in raw.peers.into_iter().enumerate() {
        let node_id = value
            .get("node_id")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let refuse = |reason: String| RefusedPeer {
            index,
            node_id: node_id.clone(),
            reason,
        };
        let peer = match peer_of(value, overlay_ipv6, own_key) {
            Ok(p) => p,
            Err(reason) => {
                refused.push(refuse(reason));
                continue;
            }
        };
        if peers.contains_key(&peer.public_key) {
            refused.push(refuse(format!(
                "public_key {:?} is already another peer's",
                peer.public_key
            )));
            continue;
        }
        if let Some(p) = peer.allowed_ips.iter().find(|p| owner.contains_key(p)) {
            refused.push(refuse(format!("allowed_ips {p} is already another peer's")));
            continue;
        }
        for p in &peer.allowed_ips {
            owner.insert(*p, peer.public_key);
        }
        peers.insert(peer.public_key, peer);
    }
    Ok((
        OverlayConfig {
            generation: raw.generation,
            node: NodeOverlay {
                overlay_ipv6,
                listen_port,
                mtu,
            },
            peers: peers.into_values().collect(),
        },
        refused,
    ))
}

fn peer_of(
    value: serde_json::Value,
    own_address: Ipv6Addr,
    own_key: Option<&PublicKey>,
) -> Result<Peer, String> {
    let raw: RawPeer = serde_json::from_value(value).map_err(|e| e.to_string())?;
    if raw.node_id.is_empty() || raw.node_id.len() > 128 {
        return Err("node_id must have 1 to 128 characters".into());
    }
    let public_key = PublicKey::parse(&raw.public_key)?;
    if Some(&public_key) == own_key {
        return Err("public_key is this node's own".into());
    }
    let endpoint = match raw.endpoint.as_deref() {
        None | Some("") => None,
        Some(e) => Some(
            e.parse::<SocketAddr>()
                .map_err(|_| format!("endpoint {e:?} is not \"[v6]:port\" or \"v4:port\""))?,
        ),
    };
    if endpoint.is_some_and(|e| e.port() == 0) {
        return Err("endpoint port must not be 0".into());
    }
    if raw.allowed_ips.len() > MAX_ALLOWED_IPS {
        return Err(format!(
            "{} allowed_ips, more than {MAX_ALLOWED_IPS}",
            raw.allowed_ips.len()
        ));
    }
    let mut allowed_ips = raw
        .allowed_ips
        .iter()
        .map(|s| Prefix::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(p) = allowed_ips.iter().find(|p| p.contains(own_address)) {
        return Err(format!(
            "allowed_ips {p} covers this node's own overlay address {own_address}"
        ));
    }
    allowed_ips.sort();
    allowed_ips.dedup();
    let keepalive_secs = match raw.keepalive_secs {
        None | Some(0) => None,
        Some(k) => {
            Some(u16::try_from(k).map_err(|_| format!("keepalive_secs {k} is above 65535"))?)
        }
    };
    Ok(Peer {
        node_id: raw.node_id,
        public_key,
        endpoint,
        allowed_ips,
        keepalive_secs,
    })
}

/// One change to bring the applied peers to the wanted ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// A new peer.
    Add(Peer),
    /// A peer whose endpoint, allowed IPs or keepalive changed (set in full).
    Update(Peer),
    /// A peer no longer wanted.
    Remove(PublicKey),
}

/// The changes from `applied` to `wanted` (both keyed by public key), removals first so
/// a prefix that moves between peers is free when the new owner is set.
pub fn diff(applied: &[Peer], wanted: &[Peer]) -> Vec<PeerChange> {
    let have: BTreeMap<&PublicKey, &Peer> = applied.iter().map(|p| (&p.public_key, p)).collect();
    let want: BTreeMap<&PublicKey, &Peer> = wanted.iter().map(|p| (&p.public_key, p)).collect();
    let mut out: Vec<PeerChange> = have
        .keys()
        .filter(|k| !want.contains_key(*k))
        .map(|k| PeerChange::Remove(**k))
        .collect();
    for (k, p) in &want {
        match have.get(k) {
            None => out.push(PeerChange::Add((*p).clone())),
            Some(old) if !same_wire(old, p) => out.push(PeerChange::Update((*p).clone())),
            Some(_) => {}
        }
    }
    out
}

/// Whether two peers are configured the same on the interface (the node id is a label
/// the interface does not hold).
fn same_wire(a: &Peer, b: &Peer) -> bool {
    a.public_key == b.public_key
        && a.endpoint == b.endpoint
        && a.allowed_ips == b.allowed_ips
        && a.keepalive_secs == b.keepalive_secs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(n: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([n; 32])
    }

    fn doc(peers: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"generation": 7, "node": {"overlay_ipv6": "fd00::1", "listen_port": 51820, "mtu": 1420}, "peers": peers})).unwrap()
    }

    fn peer(n: u8, ips: &[&str]) -> serde_json::Value {
        json!({"node_id": format!("node-{n}"), "public_key": key(n), "endpoint": format!("[fd00:ffff::{n}]:51820"), "allowed_ips": ips, "keepalive_secs": 25})
    }

    #[test]
    fn a_good_document_parses_with_defaults_and_sorted_peers() {
        let (c, refused) = parse(
            &doc(json!([
                peer(3, &["fd00::3/128", "fd00:3::/64"]),
                peer(2, &["fd00::2"])
            ])),
            None,
        )
        .unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(c.generation, 7);
        assert_eq!(c.node.listen_port, 51820);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].node_id, "node-2");
        assert_eq!(c.peers[0].allowed_ips[0].to_string(), "fd00::2/128");
        assert_eq!(c.peers[1].allowed_ips.len(), 2);
        assert_eq!(c.peers[1].keepalive_secs, Some(25));
        let minimal = br#"{"generation": 1, "node": {"overlay_ipv6": "fd00::1"}}"#;
        let (c, _) = parse(minimal, None).unwrap();
        assert_eq!(
            (c.node.listen_port, c.node.mtu),
            (DEFAULT_LISTEN_PORT, DEFAULT_MTU)
        );
        assert!(c.peers.is_empty());
    }

    #[test]
    fn each_bad_peer_is_refused_alone_with_its_reason() {
        let own = PublicKey([9; 32]);
        let mut short_key = peer(20, &["fd00::20"]);
        short_key["public_key"] =
            json!(base64::engine::general_purpose::STANDARD.encode([1u8; 16]));
        let mut hostname = peer(21, &["fd00::21"]);
        hostname["endpoint"] = json!("node21.example:51820");
        let mut keepalive = peer(22, &["fd00::22"]);
        keepalive["keepalive_secs"] = json!(70000);
        let cases = json!([
            peer(1, &["fd00::1:1"]),                 // 0: good
            peer(2, &["::/0"]),                      // 1: default route
            peer(3, &["10.0.0.0/8"]),                // 2: IPv4
            peer(4, &["fd00::/64"]),                 // 3: covers our own address
            peer(9, &["fd00::9"]),                   // 4: our own key
            short_key,                               // 5
            hostname,                                // 6
            keepalive,                               // 7
            peer(1, &["fd00::1:2"]),                 // 8: key of peer 0 again
            peer(5, &["fd00::1:1"]),                 // 9: prefix of peer 0 again
            {"node_id": "node-6"},                   // 10: no key
            peer(7, &["fd00::7", "fd00::7/129"]),    // 11: bad length
            peer(8, &["fd00:8::/16"]),               // 12: too broad
        ]);
        let (c, refused) = parse(&doc(cases), Some(&own)).unwrap();
        assert_eq!(c.peers.len(), 1, "only the good peer stays");
        assert_eq!(c.peers[0].node_id, "node-1");
        let by_index: BTreeMap<usize, &RefusedPeer> =
            refused.iter().map(|r| (r.index, r)).collect();
        assert_eq!(
            by_index.keys().copied().collect::<Vec<_>>(),
            (1..=12).collect::<Vec<_>>()
        );
        let says = |i: usize, what: &str| {
            let r = by_index[&i];
            assert!(
                r.reason.contains(what),
                "peer {i}: {:?} lacks {what:?}",
                r.reason
            );
        };
        says(1, "too broad");
        says(2, "IPv4");
        says(3, "own overlay address");
        says(4, "this node's own");
        says(5, "16 bytes");
        says(6, "endpoint");
        says(7, "keepalive_secs");
        says(8, "already another peer's");
        says(9, "fd00::1:1/128 is already another peer's");
        says(10, "public_key");
        says(11, "prefix length");
        says(12, "too broad");
        assert_eq!(by_index[&1].node_id.as_deref(), Some("node-2"));
        assert!(by_index[&1].to_string().starts_with("peer 1 (node-2): "));
    }

    #[test]
    fn a_document_that_is_not_an_overlay_is_refused_whole() {
        assert!(parse(b"not json", None)
            .unwrap_err()
            .contains("overlay document"));
        assert!(parse(br#"{"node": {"overlay_ipv6": "fd00::1"}}"#, None)
            .unwrap_err()
            .contains("generation"));
        assert!(parse(
            br#"{"generation": 1, "node": {"overlay_ipv6": "10.0.0.1"}}"#,
            None
        )
        .unwrap_err()
        .contains("node.overlay_ipv6"));
        assert!(parse(
            br#"{"generation": 1, "node": {"overlay_ipv6": "fd00::1", "mtu": 100}}"#,
            None
        )
        .unwrap_err()
        .contains("node.mtu"));
        let many: Vec<_> = (0..=MAX_PEERS).map(|_| json!({})).collect();
        assert!(parse(&doc(json!(many)), None)
            .unwrap_err()
            .contains("peers"));
    }

    fn parsed(peers: serde_json::Value) -> Vec<Peer> {
        parse(&doc(peers), None).unwrap().0.peers
    }

    #[test]
    fn the_diff_adds_updates_and_removes_by_key() {
        let applied = parsed(json!([
            peer(1, &["fd00::11"]),
            peer(2, &["fd00::12"]),
            peer(3, &["fd00::13"])
        ]));
        let mut moved = peer(2, &["fd00::12", "fd00::22"]);
        moved["endpoint"] = json!("192.0.2.2:51821");
        let mut renamed = peer(3, &["fd00::13"]);
        renamed["node_id"] = json!("node-3-renamed");
        let wanted = parsed(json!([moved, renamed, peer(4, &["fd00::14"])]));
        let changes = diff(&applied, &wanted);
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert_eq!(
            changes[0],
            PeerChange::Remove(PublicKey([1; 32])),
            "removals first"
        );
        assert!(
            matches!(&changes[1], PeerChange::Update(p) if p.public_key == PublicKey([2; 32]) && p.allowed_ips.len() == 2 && p.endpoint.unwrap().to_string() == "192.0.2.2:51821")
        );
        assert!(matches!(&changes[2], PeerChange::Add(p) if p.public_key == PublicKey([4; 32])));
        // A renamed node is the same peer on the interface: no change.
        assert!(diff(&wanted, &wanted).is_empty());
        assert!(diff(&[], &[]).is_empty());
        assert_eq!(diff(&wanted, &[]).len(), 3);
    }

    #[test]
    fn keys_print_as_wg_does() {
        let k = PublicKey::parse(&key(7)).unwrap();
        assert_eq!(k.base64(), key(7));
        assert_eq!(k.hex(), "07".repeat(32));
        assert!(PublicKey::parse("@@@").unwrap_err().contains("base64"));
    }
}
