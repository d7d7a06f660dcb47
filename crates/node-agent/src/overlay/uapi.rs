//! The WireGuard cross-platform userspace API (UAPI): the text protocol that
//! `wireguard-go` and `boringtun` serve on `/var/run/wireguard/<iface>.sock` and that
//! `wg` speaks. [`set_document`] writes a `set=1` request from the changes to make;
//! [`parse_get`] reads a `get=1` answer into the device's state (peers, handshakes,
//! counters) for the drift check and the overlay table.
//!
//! Hand-written: the protocol is a dozen `key=value` lines, and no maintained crate
//! offers the client side of it without also bringing a WireGuard implementation. This
//! module formats and parses text; it opens no socket. The private key is written only
//! into the request it is given for and never appears in errors.

use std::net::SocketAddr;

use super::config::{Peer, PeerChange, Prefix, PublicKey};

/// A `set=1` request: the interface settings (when given) and the peer changes.
/// `private_key` is the 32 raw bytes (sent as hex, as the protocol wants).
pub fn set_document(
    private_key: Option<&[u8; 32]>,
    listen_port: Option<u16>,
    changes: &[PeerChange],
) -> String {
    let mut out = String::from("set=1\n");
    if let Some(k) = private_key {
        out.push_str(&format!("private_key={}\n", hex::encode(k)));
    }
    if let Some(p) = listen_port {
        out.push_str(&format!("listen_port={p}\n"));
    }
    for c in changes {
        match c {
            PeerChange::Remove(k) => {
                out.push_str(&format!("public_key={}\nremove=true\n", k.hex()));
            }
            PeerChange::Add(p) | PeerChange::Update(p) => {
                out.push_str(&format!("public_key={}\n", p.public_key.hex()));
                if let Some(e) = p.endpoint {
                    out.push_str(&format!("endpoint={e}\n"));
                }
                out.push_str(&format!(
                    "persistent_keepalive_interval={}\n",
                    p.keepalive_secs.unwrap_or(0)
                ));
                out.push_str("replace_allowed_ips=true\n");
                for ip in &p.allowed_ips {
                    out.push_str(&format!("allowed_ip={ip}\n"));
                }
            }
        }
    }
    out.push('\n');
    out
}

/// A peer as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerState {
    /// Public key.
    pub public_key: Option<PublicKey>,
    /// Current endpoint (the configured one, or where it last sent from).
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs, sorted.
    pub allowed_ips: Vec<Prefix>,
    /// Persistent keepalive (0: off).
    pub keepalive_secs: u16,
    /// Seconds since the epoch of the last handshake (0: never).
    pub last_handshake_secs: u64,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// The device as a `get=1` answer describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceState {
    /// Whether a private key is set.
    pub has_private_key: bool,
    /// sha256 of the private key set, to compare with the wanted one (the key itself
    /// is not kept).
    pub private_key_sha256: Option<[u8; 32]>,
    /// Listen port.
    pub listen_port: Option<u16>,
    /// Peers in the order reported.
    pub peers: Vec<PeerState>,
}

impl DeviceState {
    /// The peers as [`Peer`]s, to diff against the wanted ones (node ids are not on
    /// the device; a peer without a key is skipped). `endpoint` is the configured one
    /// only when `wanted` says so: a roaming peer's endpoint is where it last sent
    /// from, which is not drift.
    pub fn as_peers(&self, wanted: &[Peer]) -> Vec<Peer> {
        self.peers
            .iter()
            .filter_map(|p| {
                let key = p.public_key?;
                let want = wanted.iter().find(|w| w.public_key == key);
                Some(Peer {
                    node_id: want.map(|w| w.node_id.clone()).unwrap_or_default(),
                    public_key: key,
                    endpoint: match want {
                        Some(w) if w.endpoint.is_none() => None,
                        _ => p.endpoint,
                    },
                    allowed_ips: p.allowed_ips.clone(),
                    keepalive_secs: (p.keepalive_secs > 0).then_some(p.keepalive_secs),
                })
            })
            .collect()
    }
}

/// Parses a `get=1` answer (up to and including `errno=N`). A non-zero errno is an
/// error; unknown keys are skipped (newer implementations add some).
pub fn parse_get(text: &str) -> Result<DeviceState, String> {
    let mut dev = DeviceState::default();
    let mut errno: Option<i64> = None;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("UAPI answer line without '=': {:?}", truncate(line)))?;
        let bad = || format!("UAPI answer: bad value for {k}: {:?}", truncate(v));
        let peer = |dev: &mut DeviceState| -> Result<usize, String> {
            dev.peers
                .len()
                .checked_sub(1)
                .ok_or_else(|| format!("UAPI answer: {k} before any public_key"))
        };
        match k {
            "private_key" => {
                dev.has_private_key = v.bytes().any(|b| b != b'0');
                dev.private_key_sha256 = match (dev.has_private_key, hex::decode(v)) {
                    (true, Ok(k)) if k.len() == 32 => Some(sha256(&k)),
                    // Never echoed: the value is a secret.
                    (true, _) => return Err("UAPI answer: private_key is not 32 hex bytes".into()),
                    (false, _) => None,
                };
            }
            "listen_port" => dev.listen_port = Some(v.parse().map_err(|_| bad())?),
            "public_key" => {
                let bytes: [u8; 32] = hex::decode(v)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(bad)?;
                dev.peers.push(PeerState {
                    public_key: Some(PublicKey(bytes)),
                    ..PeerState::default()
                });
            }
            "endpoint" => {
                let i = peer(&mut dev)?;
                dev.peers[i].endpoint = Some(v.parse().map_err(|_| bad())?);
            }
            "allowed_ip" => {
                let i = peer(&mut dev)?;
                let p = Prefix::parse(v).map_err(|_| bad())?;
                dev.peers[i].allowed_ips.push(p);
                dev.peers[i].allowed_ips.sort();
            }
            "persistent_keepalive_interval" => {
                let i = peer(&mut dev)?;
                dev.peers[i].keepalive_secs = v.parse().map_err(|_| bad())?;
            }
            "last_handshake_time_sec" => {
                let i = peer(&mut dev)?;
                dev.peers[i].last_handshake_secs = v.parse().map_err(|_| bad())?;
            }
            "rx_bytes" => {
                let i = peer(&mut dev)?;
                dev.peers[i].rx_bytes = v.parse().map_err(|_| bad())?;
            }
            "tx_bytes" => {
                let i = peer(&mut dev)?;
                dev.peers[i].tx_bytes = v.parse().map_err(|_| bad())?;
            }
            "errno" => errno = Some(v.parse().map_err(|_| bad())?),
            _ => {}
        }
    }
    match errno {
        Some(0) => Ok(dev),
        Some(n) => Err(format!("UAPI answered errno={n}")),
        None => Err("UAPI answer ended without errno".into()),
    }
}

/// The `errno` of a `set=1` answer: `Ok` for 0.
pub fn parse_set_answer(text: &str) -> Result<(), String> {
    let errno = text
        .lines()
        .find_map(|l| l.strip_prefix("errno="))
        .ok_or("UAPI set answer without errno")?;
    match errno.trim() {
        "0" => Ok(()),
        n => Err(format!("UAPI set answered errno={n}")),
    }
}

/// sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{diff, parse};
    use super::*;
    use base64::Engine as _;
    use serde_json::json;

    fn key(n: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([n; 32])
    }

    fn peers(v: serde_json::Value) -> Vec<Peer> {
        let doc = json!({"generation": 1, "node": {"overlay_ipv6": "fd00::1"}, "peers": v});
        parse(&serde_json::to_vec(&doc).unwrap(), None)
            .unwrap()
            .0
            .peers
    }

    #[test]
    fn a_set_request_configures_adds_updates_and_removes() {
        let wanted = peers(json!([
            {"node_id": "b", "public_key": key(2), "endpoint": "[fd00:ffff::2]:51820", "allowed_ips": ["fd00::2", "fd00::2:1"], "keepalive_secs": 25},
            {"node_id": "c", "public_key": key(3), "allowed_ips": ["fd00::3"]},
        ]));
        let applied =
            peers(json!([{"node_id": "old", "public_key": key(4), "allowed_ips": ["fd00::4"]}]));
        let changes = diff(&applied, &wanted);
        let doc = set_document(Some(&[0xab; 32]), Some(51820), &changes);
        let want = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\n\
             public_key={}\nremove=true\n\
             public_key={}\nendpoint=[fd00:ffff::2]:51820\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=fd00::2/128\nallowed_ip=fd00::2:1/128\n\
             public_key={}\npersistent_keepalive_interval=0\nreplace_allowed_ips=true\nallowed_ip=fd00::3/128\n\n",
            "ab".repeat(32),
            "04".repeat(32),
            "02".repeat(32),
            "03".repeat(32)
        );
        assert_eq!(doc, want);
        assert_eq!(set_document(None, None, &[]), "set=1\n\n");
    }

    const GET: &str = "private_key=abababababababababababababababababababababababababababababababab
listen_port=51820
public_key=0202020202020202020202020202020202020202020202020202020202020202
endpoint=[fd00:ffff::2]:51820
last_handshake_time_sec=1764460000
last_handshake_time_nsec=5
tx_bytes=1000
rx_bytes=2000
persistent_keepalive_interval=25
allowed_ip=fd00::2:1/128
allowed_ip=fd00::2/128
protocol_version=1
public_key=0303030303030303030303030303030303030303030303030303030303030303
endpoint=192.0.2.9:40000
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
allowed_ip=fd00::3/128
protocol_version=1
errno=0

";

    #[test]
    fn a_get_answer_parses_and_matches_the_applied_config() {
        let dev = parse_get(GET).unwrap();
        assert!(dev.has_private_key);
        assert_eq!(dev.private_key_sha256, Some(sha256(&[0xab; 32])));
        assert_eq!(dev.listen_port, Some(51820));
        assert_eq!(dev.peers.len(), 2);
        let b = &dev.peers[0];
        assert_eq!(
            (
                b.rx_bytes,
                b.tx_bytes,
                b.last_handshake_secs,
                b.keepalive_secs
            ),
            (2000, 1000, 1_764_460_000, 25)
        );
        assert_eq!(
            b.allowed_ips
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
            ["fd00::2/128", "fd00::2:1/128"]
        );
        let wanted = peers(json!([
            {"node_id": "b", "public_key": key(2), "endpoint": "[fd00:ffff::2]:51820", "allowed_ips": ["fd00::2", "fd00::2:1"], "keepalive_secs": 25},
            {"node_id": "c", "public_key": key(3), "allowed_ips": ["fd00::3"]},
        ]));
        // Peer c has no configured endpoint; the one the device learned is not drift.
        assert!(diff(&dev.as_peers(&wanted), &wanted).is_empty());
        // A manual change (an allowed IP removed by hand) is drift, repaired by an update.
        let drifted = GET.replace("allowed_ip=fd00::2:1/128\n", "");
        let dev = parse_get(&drifted).unwrap();
        let changes = diff(&dev.as_peers(&wanted), &wanted);
        assert!(
            matches!(&changes[..], [PeerChange::Update(p)] if p.node_id == "b"),
            "{changes:?}"
        );
    }

    #[test]
    fn bad_answers_are_errors_that_name_the_key_not_the_secret() {
        assert!(parse_get("errno=2\n").unwrap_err().contains("errno=2"));
        assert!(parse_get("listen_port=1\n")
            .unwrap_err()
            .contains("without errno"));
        assert!(parse_get("endpoint=[::1]:1\nerrno=0\n")
            .unwrap_err()
            .contains("before any public_key"));
        let e = parse_get("public_key=zz\nerrno=0\n").unwrap_err();
        assert!(e.contains("public_key"), "{e}");
        let e = parse_get("garbage\n").unwrap_err();
        assert!(e.contains("without '='"), "{e}");
        let e = parse_get("private_key=5ec2e75ec2e7\nerrno=0\n").unwrap_err();
        assert!(e.contains("private_key") && !e.contains("5ec2e7"), "{e}");
        let no_key = parse_get("private_key=0000000000000000000000000000000000000000000000000000000000000000\nerrno=0\n").unwrap();
        assert!(!no_key.has_private_key);
        assert!(parse_set_answer("errno=0\n\n").is_ok());
        assert!(parse_set_answer("errno=22\n\n").unwrap_err().contains("22"));
    }
}
