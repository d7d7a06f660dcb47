//! eth0 configuration over rtnetlink: link MTU and up, addresses, default routes.
//!
//! Raw netlink messages built here rather than with `netlink-packet-route`: guest init
//! needs exactly three request types (RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE) and their
//! acks; the fixed layouts below are ~150 lines, keep the static binary small, and avoid
//! tracking a crate family whose APIs change between minor versions. The message
//! builders are pure and unit-tested; [`Netlink`] only sends them and checks the acks.
//!
//! The module must not decide *what* to configure (that is the config's job) and must
//! not touch anything but the interface it is given and `lo`.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

// Constants of <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_addr.h>, <linux/if.h>.
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
const RTNH_F_ONLINK: u32 = 4;
const IFF_UP: u32 = 0x1;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

fn family(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Wraps a payload into a netlink message with header.
fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = 16 + payload.len();
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf
}

/// RTM_NEWLINK: set the link up and, when given, its MTU.
pub fn link_up_message(seq: u32, index: u32, mtu: Option<u32>) -> Vec<u8> {
    let mut p = Vec::new();
    p.push(AF_UNSPEC);
    p.push(0);
    p.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    p.extend_from_slice(&(index as i32).to_ne_bytes());
    p.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_flags
    p.extend_from_slice(&IFF_UP.to_ne_bytes()); // ifi_change
    if let Some(mtu) = mtu {
        push_attr(&mut p, IFLA_MTU, &mtu.to_ne_bytes());
    }
    message(RTM_NEWLINK, 0, seq, &p)
}

/// RTM_NEWADDR: `address/prefix_len` on the link, without duplicate address detection
/// (the host side owns the link; DAD would only delay the address by a second or more).
pub fn address_message(seq: u32, index: u32, address: IpAddr, prefix_len: u8) -> Vec<u8> {
    let mut p = vec![
        family(&address),
        prefix_len,
        if address.is_ipv6() { IFA_F_NODAD } else { 0 },
        RT_SCOPE_UNIVERSE,
    ];
    p.extend_from_slice(&index.to_ne_bytes());
    let bytes = addr_bytes(&address);
    push_attr(&mut p, IFA_LOCAL, &bytes);
    push_attr(&mut p, IFA_ADDRESS, &bytes);
    message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, seq, &p)
}

/// RTM_NEWROUTE: default route of the gateway's family via `gateway` on the link;
/// `onlink` when the gateway is outside the link's prefix.
pub fn default_route_message(seq: u32, index: u32, gateway: IpAddr, onlink: bool) -> Vec<u8> {
    let mut p = vec![
        family(&gateway),
        0, // dst_len: default route
        0, // src_len
        0, // tos
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
    ];
    p.extend_from_slice(&(if onlink { RTNH_F_ONLINK } else { 0 }).to_ne_bytes());
    push_attr(&mut p, RTA_GATEWAY, &addr_bytes(&gateway));
    push_attr(&mut p, RTA_OIF, &index.to_ne_bytes());
    message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq, &p)
}

/// True when `gateway` needs the on-link flag: not link-local and outside
/// `address/prefix_len`.
pub fn needs_onlink(address: IpAddr, prefix_len: u8, gateway: IpAddr) -> bool {
    match (address, gateway) {
        (IpAddr::V6(_), IpAddr::V6(g)) if (g.segments()[0] & 0xffc0) == 0xfe80 => false,
        (IpAddr::V4(a), IpAddr::V4(g)) => {
            let bits = u32::from(prefix_len.min(32));
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            (u32::from(a) & mask) != (u32::from(g) & mask)
        }
        (IpAddr::V6(a), IpAddr::V6(g)) => {
            let bits = u32::from(prefix_len.min(128));
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            (u128::from(a) & mask) != (u128::from(g) & mask)
        }
        _ => true,
    }
}

/// Parses the kernel's answer: `Ok` for an ack (error 0), the errno otherwise.
pub fn parse_ack(buf: &[u8], seq: u32) -> Result<(), String> {
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let mseq = u32::from_ne_bytes([buf[off + 8], buf[off + 9], buf[off + 10], buf[off + 11]]);
        if len < 16 || off + len > buf.len() {
            return Err("malformed netlink reply".into());
        }
        if kind == NLMSG_ERROR && mseq == seq {
            if len < 20 {
                return Err("short netlink error message".into());
            }
            let code =
                i32::from_ne_bytes([buf[off + 16], buf[off + 17], buf[off + 18], buf[off + 19]]);
            return if code == 0 {
                Ok(())
            } else {
                Err(nix::errno::Errno::from_raw(-code).desc().to_string())
            };
        }
        off += (len + 3) & !3;
    }
    Err("no netlink ack for the request".into())
}

/// A NETLINK_ROUTE socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens and binds the socket.
    pub fn open() -> Result<Netlink, String> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(|e| format!("netlink socket: {e}"))?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|e| format!("netlink bind: {e}"))?;
        Ok(Netlink { fd, seq: 0 })
    }

    /// Next sequence number for a request.
    pub fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Sends one request and waits for its ack.
    pub fn request(&mut self, msg: &[u8], seq: u32) -> Result<(), String> {
        socket::sendto(
            self.fd.as_raw_fd(),
            msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(|e| format!("netlink send: {e}"))?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| format!("netlink recv: {e}"))?;
            match parse_ack(&buf[..n], seq) {
                Err(e) if e == "no netlink ack for the request" => continue,
                other => return other,
            }
        }
    }
}

/// Index of an interface by name.
pub fn ifindex(name: &str) -> Result<u32, String> {
    nix::net::if_::if_nametoindex(name).map_err(|e| format!("interface {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_ne_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    #[test]
    fn link_message_layout() {
        let m = link_up_message(7, 3, Some(1420));
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        assert_eq!(m.len(), 16 + 16 + 8);
        assert_eq!(u16_at(&m, 4), RTM_NEWLINK);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&m, 8), 7);
        assert_eq!(u32_at(&m, 20), 3, "ifindex");
        assert_eq!(u32_at(&m, 24), IFF_UP);
        assert_eq!((u16_at(&m, 32), u16_at(&m, 34)), (8, IFLA_MTU));
        assert_eq!(u32_at(&m, 36), 1420);
        assert_eq!(link_up_message(1, 1, None).len(), 32);
    }

    #[test]
    fn address_message_layout() {
        let m = address_message(1, 2, "fd00::5".parse().unwrap(), 128);
        assert_eq!(u16_at(&m, 4), RTM_NEWADDR);
        assert_eq!(
            u16_at(&m, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(&m[16..20], &[AF_INET6, 128, IFA_F_NODAD, 0]);
        assert_eq!(u32_at(&m, 20), 2);
        assert_eq!((u16_at(&m, 24), u16_at(&m, 26)), (20, IFA_LOCAL));
        assert_eq!(
            m[28..44],
            "fd00::5".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(m.len(), 16 + 8 + 20 + 20);
        let v4 = address_message(1, 2, "169.254.0.2".parse().unwrap(), 30);
        assert_eq!(&v4[16..20], &[AF_INET, 30, 0, 0]);
        assert_eq!(v4.len(), 16 + 8 + 8 + 8);
    }

    #[test]
    fn route_message_layout() {
        let m = default_route_message(9, 4, "169.254.0.1".parse().unwrap(), false);
        assert_eq!(u16_at(&m, 4), RTM_NEWROUTE);
        assert_eq!(
            &m[16..24],
            &[
                AF_INET,
                0,
                0,
                0,
                RT_TABLE_MAIN,
                RTPROT_BOOT,
                RT_SCOPE_UNIVERSE,
                RTN_UNICAST
            ]
        );
        assert_eq!(u32_at(&m, 24), 0);
        assert_eq!((u16_at(&m, 28), u16_at(&m, 30)), (8, RTA_GATEWAY));
        assert_eq!(&m[32..36], &[169, 254, 0, 1]);
        assert_eq!((u16_at(&m, 36), u16_at(&m, 38)), (8, RTA_OIF));
        assert_eq!(u32_at(&m, 40), 4);
        let on = default_route_message(9, 4, "fd00::1".parse().unwrap(), true);
        assert_eq!(u32_at(&on, 24), RTNH_F_ONLINK);
    }

    #[test]
    fn onlink_only_for_gateways_outside_the_prefix() {
        let p = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(!needs_onlink(p("fd00::2"), 128, p("fe80::1")));
        assert!(needs_onlink(p("fd00::2"), 128, p("fd00::1")));
        assert!(!needs_onlink(p("fd00::2"), 64, p("fd00::1")));
        assert!(!needs_onlink(p("169.254.0.2"), 30, p("169.254.0.1")));
        assert!(needs_onlink(p("169.254.0.6"), 30, p("169.254.0.1")));
    }

    #[test]
    fn acks_and_errors_are_parsed() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&5u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        assert_eq!(parse_ack(&ack, 5), Ok(()));
        assert!(parse_ack(&ack, 6).is_err());
        ack[16..20].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        assert_eq!(parse_ack(&ack, 5).unwrap_err(), "No such device");
    }
}
