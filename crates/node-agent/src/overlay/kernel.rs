//! The node's WireGuard device with the kernel backend: the interface is a kernel link
//! of kind `wireguard` (created over rtnetlink), configured with the generic netlink
//! family `wireguard` (`WG_CMD_SET_DEVICE`) and read back with `WG_CMD_GET_DEVICE` (a
//! dump whose parts are merged here). It takes the same configuration path as the
//! userspace backend: [`super::device::apply_with`] reads the state, diffs it against
//! the wanted configuration and hands this module only the changes; the interface's
//! MTU, address and routes are set by the same rtnetlink code.
//!
//! The message building ([`set_messages`]) and reading ([`state_from`]) are plain
//! functions over the `netlink-packet-wireguard` types, so they are tested on any host;
//! [`KernelDevice`] does the I/O (Linux only). Every netlink exchange is bounded by
//! [`NETLINK_TIMEOUT`].
//!
//! Needs root (`CAP_NET_ADMIN`) and the kernel's WireGuard (module `wireguard`, Linux
//! 5.6 and later). This module applies what it is given and never decides what the
//! overlay should be. It never logs or returns the private key: this module's copies
//! of the messages that carry it (a set with a new key, every get answer) are wiped
//! when dropped, and the state keeps only the key's sha256. The netlink library's own
//! send and receive buffers are not wiped; nothing here can reach them.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use netlink_packet_core::Emitable as _;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use zeroize::Zeroize as _;

use super::config::{PeerChange, Prefix, PublicKey};
use super::uapi::{sha256, DeviceState, PeerState};

/// Bound of one netlink exchange.
pub const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest peer list sent in one `WG_CMD_SET_DEVICE` message, in bytes of attributes;
/// more peers go in further messages (like `wg(8)`, which splits at its buffer size).
/// One peer is never split, so its allowed IPs are replaced at once.
pub const MAX_PEERS_BYTES_PER_MESSAGE: usize = 32 * 1024;

/// `WG_CMD_SET_DEVICE` messages that bring a device to a new key and port (when given)
/// and send `changes`: a removed peer is removed, an added or updated one is set in
/// full (endpoint when configured, keepalive, allowed IPs replaced). The first message
/// carries the key and port; peers are split across messages by
/// [`MAX_PEERS_BYTES_PER_MESSAGE`]. No change at all is one message that sets nothing.
pub fn set_messages(
    iface: &str,
    private_key: Option<&[u8; 32]>,
    listen_port: Option<u16>,
    changes: &[PeerChange],
) -> WipedMessages {
    let head = |first: bool| {
        let mut attrs = vec![WireguardAttribute::IfName(iface.to_string())];
        if first {
            if let Some(k) = private_key {
                attrs.push(WireguardAttribute::PrivateKey(*k));
            }
            if let Some(p) = listen_port {
                attrs.push(WireguardAttribute::ListenPort(p));
            }
        }
        attrs
    };
    let mut batches: Vec<Vec<WireguardPeer>> = Vec::new();
    let mut size = 0usize;
    for change in changes {
        let peer = peer_message(change);
        let len = peer.buffer_len();
        match batches.last_mut() {
            Some(batch) if size + len <= MAX_PEERS_BYTES_PER_MESSAGE => {
                batch.push(peer);
                size += len;
            }
            _ => {
                batches.push(vec![peer]);
                size = len;
            }
        }
    }
    let mut out = Vec::with_capacity(batches.len().max(1));
    if batches.is_empty() {
        out.push(set_device(head(true)));
    }
    for (i, batch) in batches.into_iter().enumerate() {
        let mut attrs = head(i == 0);
        attrs.push(WireguardAttribute::Peers(batch));
        out.push(set_device(attrs));
    }
    WipedMessages(out)
}

fn set_device(attributes: Vec<WireguardAttribute>) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::SetDevice,
        attributes,
    }
}

fn peer_message(change: &PeerChange) -> WireguardPeer {
    match change {
        PeerChange::Remove(k) => WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(k.0),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ]),
        PeerChange::Add(p) | PeerChange::Update(p) => {
            let mut attrs = vec![
                WireguardPeerAttribute::PublicKey(p.public_key.0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
            ];
            if let Some(e) = p.endpoint {
                attrs.push(WireguardPeerAttribute::Endpoint(e));
            }
            attrs.push(WireguardPeerAttribute::PersistentKeepalive(
                p.keepalive_secs.unwrap_or(0),
            ));
            attrs.push(WireguardPeerAttribute::AllowedIps(
                p.allowed_ips
                    .iter()
                    .map(|ip| {
                        WireguardAllowedIp(vec![
                            WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv6),
                            WireguardAllowedIpAttr::IpAddr(IpAddr::V6(ip.addr)),
                            WireguardAllowedIpAttr::Cidr(ip.len),
                        ])
                    })
                    .collect(),
            ));
            WireguardPeer(attrs)
        }
    }
}

/// Messages that may hold the private key: wiped when dropped, and never printed
/// (no `Debug`).
pub struct WipedMessages(pub Vec<WireguardMessage>);

impl WipedMessages {
    /// Zeroes every private key the messages hold.
    fn wipe(&mut self) {
        for m in &mut self.0 {
            for a in &mut m.attributes {
                if let WireguardAttribute::PrivateKey(k) = a {
                    k.zeroize();
                }
            }
        }
    }
}

impl Drop for WipedMessages {
    fn drop(&mut self) {
        self.wipe();
    }
}

/// The device as the parts of a `WG_CMD_GET_DEVICE` dump describe it. The kernel
/// splits a large device across parts; a peer whose allowed IPs continue in the next
/// part starts that part again with the same public key, and is merged here. An IPv4
/// allowed IP (the overlay is IPv6, so only a hand-made change puts one there) is
/// reported as its IPv4-mapped IPv6 prefix, so the diff sees it and replaces it.
pub fn state_from(parts: &WipedMessages) -> DeviceState {
    let mut dev = DeviceState::default();
    for part in &parts.0 {
        let mut first_peer_of_part = true;
        for attr in &part.attributes {
            match attr {
                WireguardAttribute::PrivateKey(k) if k.iter().any(|b| *b != 0) => {
                    dev.has_private_key = true;
                    dev.private_key_sha256 = Some(sha256(k));
                }
                WireguardAttribute::ListenPort(p) => dev.listen_port = Some(*p),
                WireguardAttribute::Peers(peers) => {
                    for p in peers {
                        let state = peer_state(p);
                        let continued = first_peer_of_part
                            && state.public_key.is_some()
                            && dev.peers.last().map(|l| l.public_key) == Some(state.public_key);
                        first_peer_of_part = false;
                        match dev.peers.last_mut() {
                            Some(last) if continued => {
                                last.allowed_ips.extend(state.allowed_ips);
                                last.allowed_ips.sort();
                                last.allowed_ips.dedup();
                            }
                            _ => dev.peers.push(state),
                        }
                    }
                }
                _ => {}
            }
        }
    }
    dev
}

fn peer_state(p: &WireguardPeer) -> PeerState {
    let mut s = PeerState::default();
    for a in &p.0 {
        match a {
            WireguardPeerAttribute::PublicKey(k) => s.public_key = Some(PublicKey(*k)),
            WireguardPeerAttribute::Endpoint(e) => s.endpoint = Some(*e),
            WireguardPeerAttribute::PersistentKeepalive(k) => s.keepalive_secs = *k,
            WireguardPeerAttribute::LastHandshake(t) => {
                s.last_handshake_secs = u64::try_from(t.seconds).unwrap_or(0)
            }
            WireguardPeerAttribute::RxBytes(n) => s.rx_bytes = *n,
            WireguardPeerAttribute::TxBytes(n) => s.tx_bytes = *n,
            WireguardPeerAttribute::AllowedIps(ips) => {
                s.allowed_ips.extend(ips.iter().filter_map(allowed_ip));
            }
            _ => {}
        }
    }
    s.allowed_ips.sort();
    s.allowed_ips.dedup();
    s
}

fn allowed_ip(ip: &WireguardAllowedIp) -> Option<Prefix> {
    let addr = ip.0.iter().find_map(|a| match a {
        WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
        _ => None,
    })?;
    let cidr = ip.0.iter().find_map(|a| match a {
        WireguardAllowedIpAttr::Cidr(c) => Some(*c),
        _ => None,
    })?;
    let (addr, len): (Ipv6Addr, u8) = match addr {
        IpAddr::V6(a) => (a, cidr.min(128)),
        IpAddr::V4(a) => (a.to_ipv6_mapped(), 96 + cidr.min(32)),
    };
    Some(Prefix { addr, len })
}

#[cfg(target_os = "linux")]
pub use io::KernelDevice;

#[cfg(target_os = "linux")]
mod io {
    use futures_util::StreamExt as _;
    use genetlink::GenetlinkHandle;
    use netlink_packet_core::{
        NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_generic::GenlMessage;
    use netlink_packet_wireguard::{WireguardAttribute, WireguardCmd, WireguardMessage};

    use super::super::config::PeerChange;
    use super::super::device::{DeviceError, WgControl};
    use super::super::uapi::DeviceState;
    use super::{set_messages, state_from, WipedMessages, NETLINK_TIMEOUT};

    /// The kernel WireGuard device of one interface.
    #[derive(Debug, Clone)]
    pub struct KernelDevice {
        iface: String,
    }

    /// One generic netlink connection, its driver task aborted when dropped.
    struct Genl {
        handle: GenetlinkHandle,
        driver: tokio::task::JoinHandle<()>,
    }

    impl Drop for Genl {
        fn drop(&mut self) {
            self.driver.abort();
        }
    }

    impl KernelDevice {
        /// The device of interface `iface`.
        pub fn new(iface: &str) -> KernelDevice {
            KernelDevice {
                iface: iface.to_string(),
            }
        }

        fn err(&self, step: &str, message: impl std::fmt::Display) -> DeviceError {
            DeviceError {
                iface: self.iface.clone(),
                step: step.to_string(),
                message: message.to_string(),
            }
        }

        fn open(&self, step: &str) -> Result<Genl, DeviceError> {
            let (conn, handle, _) = genetlink::new_connection()
                .map_err(|e| self.err(step, format!("open a generic netlink socket: {e}")))?;
            Ok(Genl {
                handle,
                driver: tokio::spawn(conn),
            })
        }

        /// Sends one message and collects the answers (a dump's parts, or the ack),
        /// all within [`NETLINK_TIMEOUT`]. A kernel error is returned with its errno
        /// text; "the family is unknown" means the kernel has no WireGuard.
        async fn exchange(
            &self,
            genl: &mut Genl,
            step: &str,
            msg: &WireguardMessage,
            flags: u16,
        ) -> Result<WipedMessages, DeviceError> {
            let mut header = NetlinkHeader::default();
            header.flags = flags;
            let request = NetlinkMessage::new(
                header,
                NetlinkPayload::from(GenlMessage::from_payload(msg.clone())),
            );
            // The clone above may hold the key: it moves into the request and is
            // serialized by the connection; the caller's copy is wiped.
            let work = async {
                let mut answers = genl.handle.request(request).await.map_err(|e| {
                    let text = e.to_string();
                    if text.contains("family") || text.contains("No such file") {
                        format!("the kernel has no WireGuard generic netlink family (is the wireguard module available?): {e}")
                    } else {
                        text
                    }
                })?;
                let mut parts = WipedMessages(Vec::new());
                while let Some(answer) = answers.next().await {
                    let answer = answer.map_err(|e| format!("decode: {e}"))?;
                    match answer.payload {
                        NetlinkPayload::InnerMessage(m) => parts.0.push(m.payload),
                        NetlinkPayload::Error(e) if e.code.is_some() => {
                            return Err(e.to_io().to_string())
                        }
                        _ => {}
                    }
                }
                Ok(parts)
            };
            match tokio::time::timeout(NETLINK_TIMEOUT, work).await {
                Ok(r) => r.map_err(|m| self.err(step, m)),
                Err(_) => Err(self.err(step, format!("no answer within {NETLINK_TIMEOUT:?}"))),
            }
        }

        /// The interface's kind, `None` when there is no interface.
        async fn kind(&self) -> Result<Option<Option<String>>, DeviceError> {
            crate::network::link_kind(&self.iface)
                .await
                .map_err(|e| self.err("look up the interface", e))
        }

        /// Removes the interface; whether it existed.
        pub async fn remove(&self) -> Result<bool, DeviceError> {
            let existed = self.kind().await?.is_some();
            crate::network::delete_link(&self.iface)
                .await
                .map_err(|e| self.err("delete the interface", e))?;
            Ok(existed)
        }

        /// Brings the device to `cfg` (see [`super::super::device::apply_with`]).
        pub async fn apply(
            &self,
            cfg: &super::super::config::OverlayConfig,
            private_key: &[u8; 32],
        ) -> Result<super::super::device::Applied, DeviceError> {
            super::super::device::apply_with(self, cfg, private_key).await
        }
    }

    #[async_trait::async_trait]
    impl WgControl for KernelDevice {
        fn iface(&self) -> &str {
            &self.iface
        }
        /// The device's state, `None` when the interface does not exist.
        async fn state(&self) -> Result<Option<DeviceState>, DeviceError> {
            match self.kind().await? {
                None => return Ok(None),
                Some(Some(k)) if k == "wireguard" => {}
                Some(k) => {
                    return Err(self.err(
                        "WG_CMD_GET_DEVICE",
                        format!(
                            "the interface is not a kernel WireGuard link (kind {})",
                            k.as_deref().unwrap_or("none")
                        ),
                    ))
                }
            }
            let mut genl = self.open("WG_CMD_GET_DEVICE")?;
            let get = WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![WireguardAttribute::IfName(self.iface.clone())],
            };
            let parts = self
                .exchange(
                    &mut genl,
                    "WG_CMD_GET_DEVICE",
                    &get,
                    NLM_F_REQUEST | NLM_F_DUMP,
                )
                .await?;
            Ok(Some(state_from(&parts)))
        }

        /// Makes the interface a kernel WireGuard link: creates it when missing, and
        /// replaces a link of the same name of another kind (the userspace backend's
        /// tun device, when the backend changed). Returns whether it created one.
        async fn ensure(&self) -> Result<bool, DeviceError> {
            match self.kind().await? {
                Some(Some(k)) if k == "wireguard" => return Ok(false),
                None => {}
                Some(k) => {
                    tracing::warn!(interface = %self.iface, kind = k.as_deref().unwrap_or("none"), "the overlay interface is not a kernel WireGuard link; replacing it");
                    crate::network::delete_link(&self.iface)
                        .await
                        .map_err(|e| self.err("replace the interface", e))?;
                }
            }
            crate::network::create_wireguard_link(&self.iface)
                .await
                .map_err(|e| {
                    self.err(
                        "create the kernel WireGuard link",
                        format!("{e} (does this kernel have WireGuard? see overlay.backend)"),
                    )
                })?;
            Ok(true)
        }

        /// Sends key, port and peer changes.
        async fn set(
            &self,
            private_key: Option<&[u8; 32]>,
            listen_port: Option<u16>,
            changes: &[PeerChange],
        ) -> Result<(), DeviceError> {
            let messages = set_messages(&self.iface, private_key, listen_port, changes);
            let mut genl = self.open("WG_CMD_SET_DEVICE")?;
            for m in &messages.0 {
                self.exchange(&mut genl, "WG_CMD_SET_DEVICE", m, NLM_F_REQUEST | NLM_F_ACK)
                    .await?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::config::Peer;
    use netlink_packet_core::ParseableParametrized as _;
    use netlink_packet_generic::GenlHeader;
    use netlink_packet_wireguard::WireguardTimeSpec;

    fn key(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn peer(b: u8, ips: &[&str]) -> Peer {
        Peer {
            node_id: format!("n{b}"),
            public_key: key(b),
            endpoint: Some("[fd00::1]:51820".parse().unwrap()),
            allowed_ips: ips.iter().map(|s| Prefix::parse(s).unwrap()).collect(),
            keepalive_secs: Some(25),
        }
    }

    /// Emits a message as the kernel would see it and parses it back (the crate's
    /// wire format, including nesting and flags).
    fn wire(m: &WireguardMessage) -> WireguardMessage {
        let header = GenlHeader {
            cmd: u8::from(m.cmd),
            version: 1,
        };
        let mut buf = vec![0u8; header.buffer_len() + m.buffer_len()];
        header.emit(&mut buf);
        m.emit(&mut buf[header.buffer_len()..]);
        WireguardMessage::parse_with_param(&buf[header.buffer_len()..], header).unwrap()
    }

    #[test]
    fn a_set_carries_key_port_and_each_change_as_the_kernel_expects() {
        let changes = vec![
            PeerChange::Remove(key(9)),
            PeerChange::Add(peer(1, &["fd00::1/128", "fd00:1::/64"])),
            PeerChange::Update(Peer {
                endpoint: None,
                keepalive_secs: None,
                ..peer(2, &["fd00::2/128"])
            }),
        ];
        let msgs = set_messages("plfm-wg0", Some(&[7; 32]), Some(51820), &changes);
        assert_eq!(msgs.0.len(), 1);
        let m = wire(&msgs.0[0]);
        assert_eq!(m.cmd, WireguardCmd::SetDevice);
        assert_eq!(
            m.attributes[0],
            WireguardAttribute::IfName("plfm-wg0".into())
        );
        assert_eq!(m.attributes[1], WireguardAttribute::PrivateKey([7; 32]));
        assert_eq!(m.attributes[2], WireguardAttribute::ListenPort(51820));
        let WireguardAttribute::Peers(peers) = &m.attributes[3] else {
            panic!("no peers: {:?}", m.attributes[3]);
        };
        assert_eq!(
            peers[0].0,
            vec![
                WireguardPeerAttribute::PublicKey([9; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)
            ]
        );
        // Allowed IPs are replaced, the endpoint and keepalive set.
        assert!(peers[1].0.contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        assert!(peers[1].0.contains(&WireguardPeerAttribute::Endpoint(
            "[fd00::1]:51820".parse().unwrap()
        )));
        assert!(peers[1]
            .0
            .contains(&WireguardPeerAttribute::PersistentKeepalive(25)));
        let ips = peers[1]
            .0
            .iter()
            .find_map(|a| match a {
                WireguardPeerAttribute::AllowedIps(v) => Some(v.len()),
                _ => None,
            })
            .unwrap();
        assert_eq!(ips, 2);
        // No endpoint configured: none sent. Keepalive off is sent as 0 (turns it off).
        assert!(!peers[2]
            .0
            .iter()
            .any(|a| matches!(a, WireguardPeerAttribute::Endpoint(_))));
        assert!(peers[2]
            .0
            .contains(&WireguardPeerAttribute::PersistentKeepalive(0)));
    }

    #[test]
    fn nothing_to_set_but_the_port_is_one_message_without_key_or_peers() {
        let msgs = set_messages("wg0", None, Some(1), &[]);
        assert_eq!(msgs.0.len(), 1);
        assert_eq!(
            msgs.0[0].attributes,
            vec![
                WireguardAttribute::IfName("wg0".into()),
                WireguardAttribute::ListenPort(1)
            ]
        );
    }

    #[test]
    fn many_peers_are_split_across_messages_and_only_the_first_carries_the_key() {
        let changes: Vec<PeerChange> = (0..=255u8)
            .map(|b| PeerChange::Add(peer(b, &["fd00::1/128", "fd00::2/128", "fd00::3/128"])))
            .collect();
        let msgs = set_messages("wg0", Some(&[1; 32]), None, &changes);
        assert!(msgs.0.len() > 1, "256 peers fit in one message");
        let mut seen = 0;
        for (i, m) in msgs.0.iter().enumerate() {
            let has_key = m
                .attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::PrivateKey(_)));
            assert_eq!(has_key, i == 0, "message {i}");
            let peers_len = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    WireguardAttribute::Peers(p) => Some((p.len(), p.as_slice().buffer_len())),
                    _ => None,
                })
                .unwrap();
            assert!(peers_len.1 <= MAX_PEERS_BYTES_PER_MESSAGE + 200);
            seen += peers_len.0;
        }
        assert_eq!(seen, 256);
    }

    #[test]
    fn the_key_is_wiped_when_the_messages_go() {
        let mut msgs = set_messages("wg0", Some(&[0xAB; 32]), None, &[]);
        assert_eq!(
            msgs.0[0].attributes[1],
            WireguardAttribute::PrivateKey([0xAB; 32])
        );
        msgs.wipe();
        assert_eq!(
            msgs.0[0].attributes[1],
            WireguardAttribute::PrivateKey([0; 32])
        );
    }

    #[test]
    fn a_dump_split_across_parts_is_merged_and_read_like_the_uapi_answer() {
        let allowed = |a: IpAddr, c: u8| {
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::Family(match a {
                    IpAddr::V4(_) => WireguardAddressFamily::Ipv4,
                    IpAddr::V6(_) => WireguardAddressFamily::Ipv6,
                }),
                WireguardAllowedIpAttr::IpAddr(a),
                WireguardAllowedIpAttr::Cidr(c),
            ])
        };
        let part1 = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::PrivateKey([3; 32]),
                WireguardAttribute::Peers(vec![
                    WireguardPeer(vec![
                        WireguardPeerAttribute::PublicKey([1; 32]),
                        WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                            seconds: 1_700_000_000,
                            nano_seconds: 5,
                        }),
                        WireguardPeerAttribute::RxBytes(10),
                        WireguardPeerAttribute::TxBytes(20),
                        WireguardPeerAttribute::PersistentKeepalive(25),
                        WireguardPeerAttribute::AllowedIps(vec![allowed(
                            "fd00::1".parse().unwrap(),
                            128,
                        )]),
                    ]),
                    WireguardPeer(vec![
                        WireguardPeerAttribute::PublicKey([2; 32]),
                        WireguardPeerAttribute::AllowedIps(vec![allowed(
                            "fd00::2".parse().unwrap(),
                            128,
                        )]),
                    ]),
                ]),
            ],
        };
        // The kernel continues peer 2's allowed IPs in the next part.
        let part2 = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([2; 32]),
                    WireguardPeerAttribute::AllowedIps(vec![
                        allowed("fd00:2::".parse().unwrap(), 64),
                        allowed("10.0.0.0".parse().unwrap(), 8),
                    ]),
                ]),
                WireguardPeer(vec![WireguardPeerAttribute::PublicKey([4; 32])]),
            ])],
        };
        let parts = WipedMessages(vec![wire(&part1), wire(&part2)]);
        let dev = state_from(&parts);
        assert_eq!(dev.listen_port, Some(51820));
        assert!(dev.has_private_key);
        assert_eq!(dev.private_key_sha256, Some(sha256(&[3; 32])));
        assert_eq!(dev.peers.len(), 3, "{dev:?}");
        assert_eq!(dev.peers[0].last_handshake_secs, 1_700_000_000);
        assert_eq!((dev.peers[0].rx_bytes, dev.peers[0].tx_bytes), (10, 20));
        assert_eq!(dev.peers[0].keepalive_secs, 25);
        let ips: Vec<String> = dev.peers[1]
            .allowed_ips
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            ips,
            ["::ffff:10.0.0.0/104", "fd00::2/128", "fd00:2::/64"],
            "merged, sorted, IPv4 mapped"
        );
        assert_eq!(dev.peers[2].public_key, Some(key(4)));
        // A device without a key reports none.
        let empty = WipedMessages(vec![WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::ListenPort(0)],
        }]);
        assert!(!state_from(&empty).has_private_key);
    }
}
