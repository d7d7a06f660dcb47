//! Host networking of an instance (DESIGN §8): its tap, the host-side addresses and
//! routes, and its nftables anti-spoofing rules. Linux only; needs root (CAP_NET_ADMIN),
//! and says so when it is missing.
//!
//! The contract: [`tap_name`] is deterministic (`plfm` + 11 hex digits of
//! sha256(instance id), 15 bytes, the kernel's limit), so leftovers are found by prefix.
//! [`setup`] is idempotent for a tap the caller owns (the caller records the tap in the
//! resource ledger before calling it and passes `owned = true` when the ledger already
//! had it); a tap of that name that the caller does not own is a collision and fails.
//! [`teardown`] removes the tap (with its addresses and routes) and the instance's
//! rules and is idempotent.
//!
//! How: the tap is created through `/dev/net/tun` (`TUNSETIFF` with `IFF_TAP |
//! IFF_NO_PI`, then `TUNSETPERSIST`); its MTU and state, addresses (`fe80::1/64` without
//! DAD, the IPv4 link address) and the /128 route are set over rtnetlink in-process
//! (one connection per call, replace semantics, so repeating a setup changes nothing);
//! teardown deletes the link (its addresses and routes go with it) and listing is a
//! netlink link dump. No `ip` process is spawned. The rules are one nftables JSON
//! document per change, applied atomically by `nft -j -f -`; what exists is read with
//! `nft -j list table`. Every netlink request and `nft` call is bounded by
//! [`COMMAND_TIMEOUT`].
//!
//! nftables: table `inet plfm`, a `prerouting` base chain that dispatches
//! `iifname vmap @taps` to one regular chain per tap (named like the tap) which drops
//! packets whose source is not the instance's own addresses (its overlay address, its
//! IPv4 link address and the one link-local address its MAC gives it); an `input` base
//! chain that lets a tap reach the host only for established flows, neighbour
//! discovery and echo, nothing else; a `forward` base chain that drops (and counts)
//! everything a guest starts through the host (guest to guest, guest to anywhere) and
//! lets only answers to flows started elsewhere through, and that lets traffic
//! forwarded *to* a tap (from the overlay, the uplink or another guest) open flows
//! only to the ports the instance declares (`oifname vmap @ingress` to one regular
//! chain per tap, `<tap>-in`, holding `tcp dport { … } accept` and the same for udp),
//! plus echo and packet-too-big; the rest is dropped and counted. The `output` chain
//! does the same for connections the host itself opens to a guest (through
//! `<tap>-host`: the declared ports and the health check's). The per-tap source
//! check drops spoofed packets with a counter too. What a guest may start is the
//! node's [`NetPolicy`] (set once at start): to the overlay prefix through the overlay
//! interface, and with egress on, to the world through the uplink (a `postrouting`
//! nat chain masquerades it) except the overlay prefix and link-local, multicast and
//! loopback ranges. Table `arp plfm` drops ARP from a tap
//! whose sender address is not that tap's guest (the `inet` family never sees ARP).
//! Each tap is persistent, owned by root (or the configured unprivileged VMM user), so
//! no other local user can attach to it, and has `accept_ra`/`accept_redirects` off.
//! This module must not decide lifecycle or log secrets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures_util::TryStreamExt as _;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::RouteMessageBuilder;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub use crate::spec::{ingress_ports, Transport};

/// Prefix of every tap the agent creates.
pub const TAP_PREFIX: &str = "plfm";

/// Longest a single netlink request or `nft` call may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Host side link-local address on every tap (the guest's IPv6 gateway).
pub const HOST_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Network errors; each names the tap and the failing step.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A command failed or could not run.
    #[error("tap {tap}: {step}: {message}")]
    Command {
        /// Tap.
        tap: String,
        /// What was being done.
        step: String,
        /// Cause (stderr, exit status or spawn error).
        message: String,
    },
    /// Another owner's tap has this name.
    #[error("tap {tap} already exists and is not owned by instance {instance_id} (name collision or leftover)")]
    Collision {
        /// Tap.
        tap: String,
        /// Instance.
        instance_id: String,
    },
    /// Not root.
    #[error("host networking needs root (CAP_NET_ADMIN) to create tap {0}")]
    NotRoot(String),
    /// A bad spec value.
    #[error("{0}")]
    Invalid(String),
}

/// The tap of an instance: `plfm` + 11 hex digits of sha256(id).
pub fn tap_name(instance_id: &str) -> String {
    let h = hex::encode(Sha256::digest(instance_id.as_bytes()));
    format!("{TAP_PREFIX}{}", &h[..11])
}

/// An IPv4 /30 link from the pool: host `.1`, guest `.2` of the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Link {
    /// Host side (the guest's gateway).
    pub host: Ipv4Addr,
    /// Guest address.
    pub guest: Ipv4Addr,
}

/// The `index`-th /30 of `pool` (a 169.254.0.0/16-style base and prefix length), if
/// it fits. Block 0 is skipped (its first address is the network's own).
pub fn ipv4_link(pool: Ipv4Addr, prefix_len: u8, index: u32) -> Option<Ipv4Link> {
    if prefix_len > 30 {
        return None;
    }
    let blocks = 1u64 << (30 - prefix_len);
    let i = u64::from(index) + 1;
    if i >= blocks {
        return None;
    }
    let base = u32::from(pool) & (u32::MAX << (32 - prefix_len));
    let block = base + (i as u32) * 4;
    Some(Ipv4Link {
        host: Ipv4Addr::from(block + 1),
        guest: Ipv4Addr::from(block + 2),
    })
}

/// A locally administered guest MAC derived from the instance id (every runtime gives
/// the guest this MAC, so its link-local address is known: [`eui64_link_local`]).
pub fn guest_mac(instance_id: &str) -> [u8; 6] {
    let h = instance_id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let b = h.to_be_bytes();
    [0x06, 0x00, b[0], b[1], b[2], b[3]]
}

/// `06:00:…` text of a MAC.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The link-local address a Linux guest derives from its MAC (modified EUI-64).
pub fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    let iid = [
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ];
    let mut o = [0u8; 16];
    o[0] = 0xfe;
    o[1] = 0x80;
    o[8..].copy_from_slice(&iid);
    Ipv6Addr::from(o)
}

/// Number of /30 links in a pool.
pub fn ipv4_link_count(prefix_len: u8) -> u32 {
    if prefix_len > 30 {
        0
    } else {
        ((1u64 << (30 - prefix_len)) - 1).min(u64::from(u32::MAX)) as u32
    }
}

/// What one instance's host network looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapPlan {
    /// Instance.
    pub instance_id: String,
    /// Tap name.
    pub tap: String,
    /// MTU.
    pub mtu: u32,
    /// The instance's overlay address (routed to the tap as a /128).
    pub ipv6: Ipv6Addr,
    /// IPv4 link, if any.
    pub ipv4: Option<Ipv4Link>,
    /// Uid and gid allowed to attach to the tap without `CAP_NET_ADMIN` (a jailed
    /// Firecracker runs unprivileged); `None`: root only.
    pub owner: Option<(u32, u32)>,
    /// The guest's MAC ([`guest_mac`]); its EUI-64 link-local address is the only
    /// link-local source the tap lets through.
    pub guest_mac: [u8; 6],
    /// The ports the instance declares (`network.ports`): the only ones that traffic
    /// forwarded to its tap (from the overlay, the uplink or another instance) may
    /// open a flow to.
    pub ingress: Vec<(Transport, u16)>,
    /// The health check's port (TCP), which the host itself may connect to besides
    /// the declared ports.
    pub health_port: Option<u16>,
}

async fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {tool}: {e}"))?;
    if let (Some(text), Some(mut si)) = (stdin, child.stdin.take()) {
        si.write_all(text.as_bytes())
            .await
            .map_err(|e| format!("{tool}: write stdin: {e}"))?;
    }
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "{tool} {}: no exit within {COMMAND_TIMEOUT:?}",
                args.join(" ")
            )
        })?
        .map_err(|e| format!("{tool}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{tool} {}: {} ({})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ))
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether a link of that name exists in this network namespace (`if_nametoindex`, no
/// process spawned: this check is on every boot's critical path).
pub async fn link_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Creates (or, when `owned`, re-uses) the tap and its addresses, routes and rules.
///
/// The tap is created through `/dev/net/tun` and configured over rtnetlink in-process
/// (MTU and up, `fe80::1/64` nodad, the /128 route, the IPv4 link address: all with
/// replace semantics), while one atomic `nft -j -f -` transaction installs the rules at
/// the same time (they name the tap, so they need not wait for it).
pub async fn setup(plan: &TapPlan, owned: bool) -> Result<(), NetworkError> {
    let tap = plan.tap.as_str();
    if !is_root() {
        return Err(NetworkError::NotRoot(tap.into()));
    }
    if !(576..=65535).contains(&plan.mtu) {
        return Err(NetworkError::Invalid(format!(
            "tap {tap}: mtu {} out of range 576..=65535",
            plan.mtu
        )));
    }
    if tap.is_empty() || tap.len() >= IFNAMSIZ || tap.contains(['\0', '/']) {
        return Err(NetworkError::Invalid(format!(
            "tap name {tap:?} is not a valid interface name"
        )));
    }
    let exists = link_exists(tap).await;
    if exists && !owned {
        return Err(NetworkError::Collision {
            tap: tap.into(),
            instance_id: plan.instance_id.clone(),
        });
    }
    let rules = rules_json(plan, &policy());
    let (links, nft) = tokio::join!(setup_links(plan, exists), nft_apply(&rules));
    links?;
    nft.map_err(|message| command_error(tap, "nftables rules", message))?;
    Ok(())
}

fn command_error(tap: &str, step: &str, message: String) -> NetworkError {
    NetworkError::Command {
        tap: tap.into(),
        step: step.into(),
        message,
    }
}

/// The tap (created unless `exists`), its MTU and state, addresses and route.
async fn setup_links(plan: &TapPlan, exists: bool) -> Result<(), NetworkError> {
    let tap = plan.tap.as_str();
    let fail = |step: &str| {
        let step = step.to_string();
        move |message: String| command_error(tap, &step, message)
    };
    if !exists {
        create_persistent_tap(tap, plan.owner).map_err(|e| match e {
            nix::errno::Errno::EPERM | nix::errno::Errno::EACCES => {
                NetworkError::NotRoot(tap.into())
            }
            e => command_error(tap, "create tap (/dev/net/tun)", e.to_string()),
        })?;
    }
    let index = nix::net::if_::if_nametoindex(tap)
        .map_err(|e| command_error(tap, "find tap", e.to_string()))?;
    let nl = Netlink::open().map_err(fail("netlink connection"))?;
    let link = rtnetlink::LinkUnspec::new_with_index(index)
        .mtu(plan.mtu)
        .up()
        .build();
    bounded(nl.handle.link().set(link).execute())
        .await
        .map_err(fail(&format!("set mtu {} and up", plan.mtu)))?;

    // No duplicate address detection: the address is usable at once (the guest's
    // gateway), and nothing else on a point-to-point tap can hold it.
    add_ipv6_nodad(&nl, index, HOST_LINK_LOCAL, 64)
        .await
        .map_err(fail(&format!("add address {HOST_LINK_LOCAL}/64 nodad")))?;

    let route = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(plan.ipv6, 128)
        .output_interface(index)
        .build();
    bounded(nl.handle.route().add(route).replace().execute())
        .await
        .map_err(fail(&format!("add route {}/128", plan.ipv6)))?;

    if let Some(v4) = plan.ipv4 {
        let add = nl
            .handle
            .address()
            .add(index, IpAddr::V4(v4.host), 30)
            .replace();
        bounded(add.execute())
            .await
            .map_err(fail(&format!("add address {}/30", v4.host)))?;
    }
    for key in TAP_SYSCTLS_OFF {
        let path = format!("/proc/sys/net/{}", key.replace("{tap}", tap));
        tokio::fs::write(&path, "0")
            .await
            .map_err(|e| command_error(tap, &format!("write 0 to {path}"), e.to_string()))?;
    }
    // IPv4 egress leaves through the tap's own forwarding switch (see `apply_policy`).
    if policy().egress_uplink.is_some() {
        write_sysctl(&format!("ipv4/conf/{tap}/forwarding"), "1")
            .map_err(|m| command_error(tap, "ipv4 forwarding", m))?;
    }
    Ok(())
}

/// Per-tap sysctls set to 0: the host takes no router advertisement or redirect from a
/// guest (a guest must not steer the host's routes).
pub const TAP_SYSCTLS_OFF: [&str; 3] = [
    "ipv6/conf/{tap}/accept_ra",
    "ipv6/conf/{tap}/accept_redirects",
    "ipv4/conf/{tap}/accept_redirects",
];

const IFNAMSIZ: usize = nix::libc::IFNAMSIZ;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags member of the union
/// (padded to the union's full size so the kernel never reads past it).
#[repr(C)]
struct TunIfReq {
    name: [u8; IFNAMSIZ],
    flags: nix::libc::c_short,
    _pad: [u8; 24 - std::mem::size_of::<nix::libc::c_short>()],
}

nix::ioctl_readwrite_bad!(
    /// TUNSETIFF: `_IOW('T', 202, int)` that takes a `struct ifreq *` (hence "bad"),
    /// which the kernel also writes (the name it chose): a mutable pointer.
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<nix::libc::c_int>()),
    TunIfReq
);
nix::ioctl_write_int!(
    /// TUNSETPERSIST: `_IOW('T', 203, int)`, the value passed directly.
    tun_set_persist,
    b'T',
    203
);
nix::ioctl_write_int!(
    /// TUNSETOWNER: `_IOW('T', 204, int)`, the uid passed directly.
    tun_set_owner,
    b'T',
    204
);
nix::ioctl_write_int!(
    /// TUNSETGROUP: `_IOW('T', 206, int)`, the gid passed directly.
    tun_set_group,
    b'T',
    206
);

/// Creates tap `name` (no packet information header) and makes it persistent, so it
/// outlives the descriptor; the VMM attaches to it later by name (as `owner`, when
/// given, without privileges).
fn create_persistent_tap(name: &str, owner: Option<(u32, u32)>) -> Result<(), nix::errno::Errno> {
    use std::os::fd::AsRawFd as _;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| {
            e.raw_os_error()
                .map_or(nix::errno::Errno::EIO, nix::errno::Errno::from_raw)
        })?;
    let mut req = TunIfReq {
        name: [0; IFNAMSIZ],
        flags: (nix::libc::IFF_TAP | nix::libc::IFF_NO_PI) as nix::libc::c_short,
        _pad: [0; 22],
    };
    // The caller checked the length (< IFNAMSIZ), so the name stays NUL-terminated.
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `dev` is an open /dev/net/tun descriptor for the whole call, and `req` is
    // a live, initialised, exclusively borrowed `struct ifreq`-compatible value
    // (NUL-terminated name, flags, zeroed rest of the union) that the kernel reads and
    // writes only within its size.
    unsafe { tun_set_iff(dev.as_raw_fd(), &mut req) }?;
    // A persistent tap with neither owner nor group can be attached by any process that
    // opens /dev/net/tun (mode 0666): it always gets an owner, root unless an
    // unprivileged VMM user is configured.
    let (uid, gid) = match owner {
        Some((uid, gid)) => (uid, Some(gid)),
        None => (0, None),
    };
    // SAFETY: `dev` is attached to the tap; TUNSETOWNER and TUNSETGROUP take plain
    // integers, no memory is passed.
    unsafe { tun_set_owner(dev.as_raw_fd(), uid as _) }?;
    if let Some(gid) = gid {
        // SAFETY: as above.
        unsafe { tun_set_group(dev.as_raw_fd(), gid as _) }?;
    }
    // SAFETY: `dev` is the descriptor TUNSETIFF just attached to the tap; TUNSETPERSIST
    // takes a plain integer, no memory is passed.
    unsafe { tun_set_persist(dev.as_raw_fd(), 1) }?;
    drop(dev);
    Ok(())
}

/// Adds (or replaces) an IPv6 address without duplicate address detection.
async fn add_ipv6_nodad(nl: &Netlink, index: u32, addr: Ipv6Addr, len: u8) -> Result<(), String> {
    let mut a = nl
        .handle
        .address()
        .add(index, IpAddr::V6(addr), len)
        .replace();
    let msg = a.message_mut();
    msg.header.flags |= AddressHeaderFlags::Nodad;
    msg.attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    bounded(a.execute()).await
}

/// One rtnetlink connection, its driver task on the current tokio runtime (aborted
/// when dropped, so no task outlives the call that opened it).
struct Netlink {
    handle: rtnetlink::Handle,
    driver: tokio::task::JoinHandle<()>,
}

impl Netlink {
    fn open() -> Result<Self, String> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| format!("open netlink socket: {e}"))?;
        Ok(Self {
            handle,
            driver: tokio::spawn(conn),
        })
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A netlink request bounded by [`COMMAND_TIMEOUT`]; the error is the kernel's errno
/// text (`File exists (os error 17)`) or the timeout.
async fn bounded<T>(
    request: impl std::future::Future<Output = Result<T, rtnetlink::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(rtnetlink::Error::NetlinkError(e))) => Err(e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no netlink answer within {COMMAND_TIMEOUT:?}")),
    }
}

/// Whether a netlink error is errno `code`.
fn is_errno(e: &rtnetlink::Error, code: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code().abs() == code)
}

const NFT_FAMILY: &str = "inet";
const NFT_TABLE: &str = "plfm";
/// The map `ifname : verdict` that dispatches each tap to its chain.
const NFT_MAP: &str = "taps";
/// The map `ifname : verdict` that sends what is forwarded to a tap to that tap's
/// ingress chain ([`ingress_chain`]).
const NFT_INGRESS_MAP: &str = "ingress";
/// Suffix of a tap's ingress chain.
const INGRESS_SUFFIX: &str = "-in";
/// The map `ifname : verdict` that sends what the host itself sends to a tap to that
/// tap's host chain ([`host_chain`]).
const NFT_HOST_MAP: &str = "host_ingress";
/// Suffix of a tap's host chain.
const HOST_SUFFIX: &str = "-host";

/// Name of `tap`'s host chain: the connections the host itself may open to the guest
/// (its declared ports and its health-check port).
fn host_chain(tap: &str) -> String {
    format!("{tap}{HOST_SUFFIX}")
}

/// What the node lets its instances reach beyond their taps: egress through the
/// uplink (masqueraded), and the overlay interface for the overlay prefix. Set once at
/// start ([`set_policy`]); every rules document carries it (the base chains are
/// refilled with each one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPolicy {
    /// The uplink egress leaves by; `None`: no egress.
    pub egress_uplink: Option<String>,
    /// The node's WireGuard interface; `None`: no overlay.
    pub overlay_interface: Option<String>,
    /// The overlay prefix (never reachable through egress).
    pub overlay_prefix: (Ipv6Addr, u8),
}

impl Default for NetPolicy {
    fn default() -> Self {
        NetPolicy {
            egress_uplink: None,
            overlay_interface: None,
            overlay_prefix: (Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0), 8),
        }
    }
}

static POLICY: std::sync::OnceLock<NetPolicy> = std::sync::OnceLock::new();

/// Sets the node's policy (once, at start; `false` when it was set already).
pub fn set_policy(policy: NetPolicy) -> bool {
    POLICY.set(policy).is_ok()
}

/// The node's policy (the default, no egress and no overlay, before [`set_policy`]).
pub fn policy() -> NetPolicy {
    POLICY.get().cloned().unwrap_or_default()
}

/// Destinations egress never reaches (IPv6): the overlay prefix, link-local,
/// multicast, and the unspecified, loopback and IPv4-compatible and -mapped ranges.
fn egress_blocked_v6(p: &NetPolicy) -> Value {
    let prefix = |a: &str, l: u8| json!({ "prefix": { "addr": a, "len": l } });
    json!({ "set": [
        prefix(&p.overlay_prefix.0.to_string(), p.overlay_prefix.1),
        prefix("fe80::", 10),
        prefix("ff00::", 8),
        prefix("::", 96),
        prefix("::ffff:0:0", 96),
    ] })
}

/// Destinations egress never reaches (IPv4): link-local (where the instances' /30
/// links are), loopback, "this network", multicast and the reserved range with the
/// broadcast address.
fn egress_blocked_v4() -> Value {
    let prefix = |a: &str, l: u8| json!({ "prefix": { "addr": a, "len": l } });
    json!({ "set": [
        prefix("169.254.0.0", 16),
        prefix("127.0.0.0", 8),
        prefix("0.0.0.0", 8),
        prefix("224.0.0.0", 3),
    ] })
}

/// Name of `tap`'s ingress chain: accepts new flows to its declared ports.
fn ingress_chain(tap: &str) -> String {
    format!("{tap}{INGRESS_SUFFIX}")
}
/// Family of the ARP table (also named [`NFT_TABLE`]).
const ARP_FAMILY: &str = "arp";
/// The set `ifname . ipv4_addr` of the sender address each tap may use in ARP.
const ARP_SET: &str = "senders";

/// Applies one nft JSON document (`nft -j -f -`: one atomic transaction).
async fn nft_apply(doc: &Value) -> Result<(), String> {
    run("nft", &["-j", "-f", "-"], Some(&doc.to_string()))
        .await
        .map(|_| ())
}

/// The objects of table `<family> plfm` (`nft -j list table`), `None` when it is absent.
async fn nft_table(family: &str) -> Result<Option<Vec<Value>>, String> {
    match run("nft", &["-j", "list", "table", family, NFT_TABLE], None).await {
        Ok(out) => {
            let doc: Value = serde_json::from_str(&out)
                .map_err(|e| format!("nft -j list table {family} {NFT_TABLE}: {e}"))?;
            Ok(Some(
                doc["nftables"].as_array().cloned().unwrap_or_default(),
            ))
        }
        Err(e) if e.contains("No such file or directory") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Names of the regular chains of the table that look like taps.
fn tap_chains(objects: &[Value]) -> Vec<String> {
    let mut taps: Vec<String> = objects
        .iter()
        .filter_map(|o| o["chain"]["name"].as_str())
        .map(|c| {
            c.strip_suffix(INGRESS_SUFFIX)
                .or_else(|| c.strip_suffix(HOST_SUFFIX))
                .unwrap_or(c)
        })
        .filter(|c| c.starts_with(TAP_PREFIX) && c.len() == 15)
        .map(String::from)
        .collect();
    taps.sort();
    taps.dedup();
    taps
}

/// The elements of the ARP `senders` set, as listed (`{"concat": [tap, addr]}`).
fn arp_elements(objects: &[Value]) -> impl Iterator<Item = &Value> {
    objects
        .iter()
        .filter(|o| o["set"]["name"] == ARP_SET)
        .filter_map(|o| o["set"]["elem"].as_array())
        .flatten()
}

/// Taps that have an element in the ARP `senders` set.
fn arp_taps(objects: &[Value]) -> Vec<String> {
    arp_elements(objects)
        .filter_map(|e| e["concat"][0].as_str().map(String::from))
        .collect()
}

/// The ARP `senders` element of `tap`.
fn arp_element(objects: &[Value], tap: &str) -> Option<Value> {
    arp_elements(objects)
        .find(|e| e["concat"][0] == tap)
        .cloned()
}

/// Whether the map `map` has an element keyed `tap`.
fn has_element(objects: &[Value], map: &str, tap: &str) -> bool {
    objects.iter().any(|o| {
        o["map"]["name"] == map
            && o["map"]["elem"]
                .as_array()
                .is_some_and(|elems| elems.iter().any(|e| e[0] == tap))
    })
}

fn nft_chain(name: &str) -> Value {
    json!({ "family": NFT_FAMILY, "table": NFT_TABLE, "name": name })
}

fn nft_rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({ "add": { "rule": {
        "family": NFT_FAMILY, "table": NFT_TABLE, "chain": chain, "expr": expr
    } } })
}

/// `left == right` (a set on the right means "is one of").
fn nft_eq(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": left, "right": right } })
}

fn nft_meta(key: &str) -> Value {
    json!({ "meta": { "key": key } })
}

fn nft_payload(protocol: &str, field: &str) -> Value {
    json!({ "payload": { "protocol": protocol, "field": field } })
}

/// The base table, map and chains (idempotent: `add` of existing objects is a no-op;
/// the base chains are flushed and refilled in the same transaction), with the
/// egress and overlay rules of `policy`.
fn base_commands(policy: &NetPolicy) -> Vec<Value> {
    // A string ending in `*` is nft's interface-name wildcard, as in the text syntax.
    let from_taps = || nft_eq(nft_meta("iifname"), json!(format!("{TAP_PREFIX}*")));
    let to_taps = || nft_eq(nft_meta("oifname"), json!(format!("{TAP_PREFIX}*")));
    let established = || {
        json!({ "match": {
            "op": "in", "left": { "ct": { "key": "state" } },
            "right": ["established", "related"]
        } })
    };
    let table = json!({ "family": NFT_FAMILY, "name": NFT_TABLE });
    let base_chain = |name: &str, prio: i32| {
        json!({ "add": { "chain": {
            "family": NFT_FAMILY, "table": NFT_TABLE, "name": name,
            "type": "filter", "hook": name, "prio": prio, "policy": "accept"
        } } })
    };
    let mut cmds = vec![
        json!({ "add": { "table": table } }),
        json!({ "add": { "map": {
            "family": NFT_FAMILY, "table": NFT_TABLE, "name": NFT_MAP,
            "type": "ifname", "map": "verdict"
        } } }),
        json!({ "add": { "map": {
            "family": NFT_FAMILY, "table": NFT_TABLE, "name": NFT_INGRESS_MAP,
            "type": "ifname", "map": "verdict"
        } } }),
        json!({ "add": { "map": {
            "family": NFT_FAMILY, "table": NFT_TABLE, "name": NFT_HOST_MAP,
            "type": "ifname", "map": "verdict"
        } } }),
        base_chain("prerouting", -150),
        base_chain("input", 0),
        base_chain("forward", 0),
        base_chain("output", 0),
        json!({ "flush": { "chain": nft_chain("prerouting") } }),
        json!({ "flush": { "chain": nft_chain("input") } }),
        json!({ "flush": { "chain": nft_chain("forward") } }),
        json!({ "flush": { "chain": nft_chain("output") } }),
        nft_rule(
            "prerouting",
            vec![json!({ "vmap": { "key": nft_meta("iifname"), "data": format!("@{NFT_MAP}") } })],
        ),
        nft_rule(
            "input",
            vec![from_taps(), established(), json!({ "accept": null })],
        ),
        // Neighbour discovery, echo and packet-too-big (errors about the host's own
        // flows are `related` above); no redirects, router adverts or anything else.
        nft_rule(
            "input",
            vec![
                from_taps(),
                nft_eq(nft_meta("l4proto"), json!("ipv6-icmp")),
                nft_eq(
                    nft_payload("icmpv6", "type"),
                    json!({ "set": [
                        "nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit",
                        "echo-request", "packet-too-big"
                    ] }),
                ),
                json!({ "accept": null }),
            ],
        ),
        nft_rule(
            "input",
            vec![
                from_taps(),
                nft_eq(nft_meta("l4proto"), json!("icmp")),
                nft_eq(nft_payload("icmp", "type"), json!("echo-request")),
                json!({ "accept": null }),
            ],
        ),
        nft_rule("input", vec![from_taps(), json!({ "drop": null })]),
        // Through the host: a guest starts nothing (not to another guest, not out);
        // answers to flows started elsewhere pass. Egress is opened deliberately by
        // the overlay work, not by default.
        nft_rule(
            "forward",
            vec![from_taps(), established(), json!({ "accept": null })],
        ),
        // Ingress: what is forwarded to a tap (from the overlay, the uplink or another
        // instance of this host) opens flows only to the ports the instance declares,
        // in its ingress chain; echo and packet-too-big pass (path MTU discovery);
        // everything else is dropped and counted.
        nft_rule(
            "forward",
            vec![to_taps(), established(), json!({ "accept": null })],
        ),
        nft_rule(
            "forward",
            vec![
                to_taps(),
                nft_eq(nft_meta("l4proto"), json!("ipv6-icmp")),
                nft_eq(
                    nft_payload("icmpv6", "type"),
                    json!({ "set": ["echo-request", "packet-too-big"] }),
                ),
                json!({ "accept": null }),
            ],
        ),
        nft_rule(
            "forward",
            vec![
                to_taps(),
                nft_eq(nft_meta("l4proto"), json!("icmp")),
                nft_eq(nft_payload("icmp", "type"), json!("echo-request")),
                json!({ "accept": null }),
            ],
        ),
        nft_rule(
            "forward",
            vec![json!({ "vmap": {
                "key": nft_meta("oifname"), "data": format!("@{NFT_INGRESS_MAP}")
            } })],
        ),
        nft_rule(
            "forward",
            vec![
                to_taps(),
                json!({ "counter": null }),
                json!({ "drop": null }),
            ],
        ),
        // What the host itself sends to a guest: answers, ICMP (neighbour discovery,
        // echo, errors), and new connections only to the guest's declared ports and its
        // health-check port (the tap's host chain); the rest is counted and dropped.
        nft_rule(
            "output",
            vec![to_taps(), established(), json!({ "accept": null })],
        ),
        nft_rule(
            "output",
            vec![
                to_taps(),
                nft_eq(nft_meta("l4proto"), json!({ "set": ["ipv6-icmp", "icmp"] })),
                json!({ "accept": null }),
            ],
        ),
        nft_rule(
            "output",
            vec![json!({ "vmap": {
                "key": nft_meta("oifname"), "data": format!("@{NFT_HOST_MAP}")
            } })],
        ),
        nft_rule(
            "output",
            vec![
                to_taps(),
                json!({ "counter": null }),
                json!({ "drop": null }),
            ],
        ),
    ]
    .into_iter()
    .chain(outbound_commands(policy, &from_taps))
    .collect::<Vec<Value>>();
    if let Some(wg) = &policy.overlay_interface {
        exclude_overlay(&mut cmds, wg);
    }
    cmds
}

/// Taps are matched by the wildcard `plfm*`, which an overlay interface of that prefix
/// (the default `plfm-wg0`) matches too: every tap rule gets `<key> != <overlay>`
/// right after its wildcard match, so the overlay is never taken for a tap (its
/// traffic would be dropped as a guest's, or its host connections as a host's
/// connection to a guest).
fn exclude_overlay(cmds: &mut [Value], wg: &str) {
    let wildcard = format!("{TAP_PREFIX}*");
    for c in cmds.iter_mut() {
        let Some(expr) = c
            .pointer_mut("/add/rule/expr")
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        let key = expr.first().and_then(|m| {
            (m["match"]["op"] == "==" && m["match"]["right"] == wildcard.as_str())
                .then(|| m["match"]["left"]["meta"]["key"].as_str().map(String::from))
                .flatten()
        });
        if let Some(key) = key {
            expr.insert(
                1,
                json!({ "match": { "op": "!=", "left": nft_meta(&key), "right": wg } }),
            );
        }
    }
}

/// What a guest may start beyond its tap (the end of the forward chain), and the
/// masquerading of egress (chain `postrouting`, type nat): to the overlay prefix
/// through the overlay interface (the destination node applies its ingress), to the
/// world through the uplink (masqueraded; the overlay prefix and link-local,
/// multicast and loopback ranges excepted); everything else counted and dropped. The
/// host's own addresses are not forwarded at all: the `input` chain guards them.
fn outbound_commands(policy: &NetPolicy, from_taps: &dyn Fn() -> Value) -> Vec<Value> {
    let mut cmds = Vec::new();
    if let Some(wg) = &policy.overlay_interface {
        cmds.push(nft_rule(
            "forward",
            vec![
                from_taps(),
                nft_eq(nft_meta("oifname"), json!(wg)),
                nft_eq(
                    nft_payload("ip6", "daddr"),
                    json!({ "prefix": {
                        "addr": policy.overlay_prefix.0.to_string(),
                        "len": policy.overlay_prefix.1
                    } }),
                ),
                json!({ "accept": null }),
            ],
        ));
    }
    let not_in =
        |field: Value, set: Value| json!({ "match": { "op": "!=", "left": field, "right": set } });
    if let Some(uplink) = &policy.egress_uplink {
        cmds.push(nft_rule(
            "forward",
            vec![
                from_taps(),
                nft_eq(nft_meta("oifname"), json!(uplink)),
                not_in(nft_payload("ip6", "daddr"), egress_blocked_v6(policy)),
                json!({ "accept": null }),
            ],
        ));
        cmds.push(nft_rule(
            "forward",
            vec![
                from_taps(),
                nft_eq(nft_meta("oifname"), json!(uplink)),
                not_in(nft_payload("ip", "daddr"), egress_blocked_v4()),
                json!({ "accept": null }),
            ],
        ));
    }
    cmds.push(nft_rule(
        "forward",
        vec![
            from_taps(),
            json!({ "counter": null }),
            json!({ "drop": null }),
        ],
    ));
    // The overlay carries traffic to this node's instances (accepted above, on their
    // declared ports) and nothing through: no transit to the uplink or elsewhere.
    if let Some(wg) = &policy.overlay_interface {
        cmds.push(nft_rule(
            "forward",
            vec![
                nft_eq(nft_meta("iifname"), json!(wg)),
                json!({ "counter": null }),
                json!({ "drop": null }),
            ],
        ));
    }
    cmds.push(json!({ "add": { "chain": {
        "family": NFT_FAMILY, "table": NFT_TABLE, "name": "postrouting",
        "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"
    } } }));
    cmds.push(json!({ "flush": { "chain": nft_chain("postrouting") } }));
    if let Some(uplink) = &policy.egress_uplink {
        cmds.push(nft_rule(
            "postrouting",
            vec![
                from_taps(),
                nft_eq(nft_meta("oifname"), json!(uplink)),
                json!({ "counter": null }),
                json!({ "masquerade": null }),
            ],
        ));
    }
    cmds
}

/// The ARP table: a tap's ARP must name its guest's address as sender (a tap with no
/// IPv4 link has no element: all its ARP is dropped).
fn arp_base_commands() -> Vec<Value> {
    let table = json!({ "family": ARP_FAMILY, "name": NFT_TABLE });
    let chain = json!({ "family": ARP_FAMILY, "table": NFT_TABLE, "name": "input" });
    vec![
        json!({ "add": { "table": table } }),
        json!({ "add": { "set": {
            "family": ARP_FAMILY, "table": NFT_TABLE, "name": ARP_SET,
            "type": ["ifname", "ipv4_addr"]
        } } }),
        json!({ "add": { "chain": {
            "family": ARP_FAMILY, "table": NFT_TABLE, "name": "input",
            "type": "filter", "hook": "input", "prio": 0, "policy": "accept"
        } } }),
        json!({ "flush": { "chain": chain } }),
        json!({ "add": { "rule": {
            "family": ARP_FAMILY, "table": NFT_TABLE, "chain": "input", "expr": [
                nft_eq(nft_meta("iifname"), json!(format!("{TAP_PREFIX}*"))),
                { "match": {
                    "op": "!=",
                    "left": { "concat": [nft_meta("iifname"), nft_payload("arp", "saddr ip")] },
                    "right": format!("@{ARP_SET}")
                } },
                { "drop": null }
            ]
        } } }),
    ]
}

/// Rules of one instance (with the base objects): only its own source addresses leave
/// its tap. One `nft -j` document.
fn rules_json(plan: &TapPlan, policy: &NetPolicy) -> Value {
    let tap = plan.tap.as_str();
    let ret = || json!({ "return": null });
    let mut cmds = base_commands(policy);
    cmds.push(json!({ "add": { "chain": nft_chain(tap) } }));
    cmds.push(json!({ "flush": { "chain": nft_chain(tap) } }));
    cmds.push(nft_rule(
        tap,
        vec![
            nft_eq(
                nft_payload("ip6", "saddr"),
                json!({ "set": [
                    plan.ipv6.to_string(),
                    eui64_link_local(plan.guest_mac).to_string()
                ] }),
            ),
            ret(),
        ],
    ));
    // DAD and router/MLD solicitations come from the unspecified address.
    cmds.push(nft_rule(
        tap,
        vec![
            nft_eq(nft_meta("nfproto"), json!("ipv6")),
            nft_eq(nft_payload("ip6", "saddr"), json!("::")),
            nft_eq(
                nft_payload("icmpv6", "type"),
                json!({ "set": ["nd-neighbor-solicit", "nd-router-solicit", "mld2-listener-report"] }),
            ),
            ret(),
        ],
    ));
    if let Some(v4) = plan.ipv4 {
        cmds.push(nft_rule(
            tap,
            vec![
                nft_eq(nft_payload("ip", "saddr"), json!(v4.guest.to_string())),
                ret(),
            ],
        ));
    }
    // Anything else is spoofed: dropped, and counted (`nft list chain inet plfm <tap>`).
    cmds.push(nft_rule(
        tap,
        vec![json!({ "counter": null }), json!({ "drop": null })],
    ));
    cmds.push(json!({ "add": { "element": {
        "family": NFT_FAMILY, "table": NFT_TABLE, "name": NFT_MAP,
        "elem": [[tap, { "jump": { "target": tap } }]]
    } } }));
    // Ingress: one rule per protocol, accepting new flows to the declared ports; the
    // chain returns otherwise, and the forward chain drops.
    let ingress = ingress_chain(tap);
    cmds.push(json!({ "add": { "chain": nft_chain(&ingress) } }));
    cmds.push(json!({ "flush": { "chain": nft_chain(&ingress) } }));
    for proto in [Transport::Tcp, Transport::Udp] {
        let ports: Vec<u16> = plan
            .ingress
            .iter()
            .filter(|(p, _)| *p == proto)
            .map(|(_, port)| *port)
            .collect();
        if !ports.is_empty() {
            cmds.push(nft_rule(
                &ingress,
                vec![
                    nft_eq(
                        nft_payload(proto.as_str(), "dport"),
                        json!({ "set": ports }),
                    ),
                    json!({ "accept": null }),
                ],
            ));
        }
    }
    cmds.push(json!({ "add": { "element": {
        "family": NFT_FAMILY, "table": NFT_TABLE, "name": NFT_INGRESS_MAP,
        "elem": [[tap, { "jump": { "target": ingress } }]]
    } } }));
    // The host's own connections: the same ports, and the health check's.
    let host = host_chain(tap);
    cmds.push(json!({ "add": { "chain": nft_chain(&host) } }));
    cmds.push(json!({ "flush": { "chain": nft_chain(&host) } }));
    cmds.push(nft_rule(
        &host,
        vec![json!({ "jump": { "target": ingress } })],
    ));
    if let Some(port) = plan.health_port {
        cmds.push(nft_rule(
            &host,
            vec![
                nft_eq(nft_payload("tcp", "dport"), json!(port)),
                json!({ "accept": null }),
            ],
        ));
    }
    cmds.push(json!({ "add": { "element": {
        "family": NFT_FAMILY, "table": NFT_TABLE, "name": NFT_HOST_MAP,
        "elem": [[tap, { "jump": { "target": host } }]]
    } } }));
    cmds.extend(arp_base_commands());
    if let Some(v4) = plan.ipv4 {
        cmds.push(json!({ "add": { "element": {
            "family": ARP_FAMILY, "table": NFT_TABLE, "name": ARP_SET,
            "elem": [{ "concat": [tap, v4.guest.to_string()] }]
        } } }));
    }
    json!({ "nftables": cmds })
}

/// What exists of a tap's ingress: its elements in the ingress and host maps, its
/// ingress and host chains.
#[derive(Debug, Clone, Copy, Default)]
struct Ingress {
    element: bool,
    chain: bool,
    host_element: bool,
    host_chain: bool,
}

/// Removal of one tap's map element (if `element`), chain (if `chain`), ARP sender
/// element (as listed, if any) and ingress element and chain (those that exist), as
/// one `nft -j` document.
fn removal_json(
    tap: &str,
    element: bool,
    chain: bool,
    arp: Option<Value>,
    ingress: Ingress,
) -> Value {
    let mut cmds = Vec::new();
    // The host chain jumps to the ingress chain: it goes first.
    if ingress.host_element {
        cmds.push(json!({ "delete": { "element": {
            "family": NFT_FAMILY, "table": NFT_TABLE, "name": NFT_HOST_MAP, "elem": [tap]
        } } }));
    }
    if ingress.host_chain {
        let name = host_chain(tap);
        cmds.push(json!({ "flush": { "chain": nft_chain(&name) } }));
        cmds.push(json!({ "delete": { "chain": nft_chain(&name) } }));
    }
    if ingress.element {
        cmds.push(json!({ "delete": { "element": {
            "family": NFT_FAMILY, "table": NFT_TABLE, "name": NFT_INGRESS_MAP, "elem": [tap]
        } } }));
    }
    if ingress.chain {
        let name = ingress_chain(tap);
        cmds.push(json!({ "flush": { "chain": nft_chain(&name) } }));
        cmds.push(json!({ "delete": { "chain": nft_chain(&name) } }));
    }
    if let Some(e) = arp {
        cmds.push(json!({ "delete": { "element": {
            "family": ARP_FAMILY, "table": NFT_TABLE, "name": ARP_SET, "elem": [e]
        } } }));
    }
    if element {
        cmds.push(json!({ "delete": { "element": {
            "family": NFT_FAMILY, "table": NFT_TABLE, "name": NFT_MAP, "elem": [tap]
        } } }));
    }
    if chain {
        cmds.push(json!({ "flush": { "chain": nft_chain(tap) } }));
        cmds.push(json!({ "delete": { "chain": nft_chain(tap) } }));
    }
    json!({ "nftables": cmds })
}

/// The overlay interface `iface` (created by its WireGuard implementation): MTU and
/// up, the node's overlay address as a /128 (no duplicate address detection), and its
/// routes made exactly `routes`, each prefix via the interface: missing ones added,
/// ones this function added earlier for prefixes no longer wanted (a removed peer)
/// deleted. Routes the kernel made (link-local, multicast) are left alone. Needs root.
/// The error names the step.
pub async fn configure_overlay_link(
    iface: &str,
    mtu: u32,
    addr: Ipv6Addr,
    routes: &[(Ipv6Addr, u8)],
) -> Result<(), String> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
    // The host routes between the overlay and its instances' taps; IPv6 forwarding has
    // no per-interface switch (see `apply_policy`).
    let fwd = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap_or_default();
    if fwd.trim() != "1" {
        write_sysctl("ipv6/conf/all/forwarding", "1")?;
    }
    let index =
        nix::net::if_::if_nametoindex(iface).map_err(|e| format!("find the interface: {e}"))?;
    let nl = Netlink::open()?;
    let link = rtnetlink::LinkUnspec::new_with_index(index)
        .mtu(mtu)
        .up()
        .build();
    bounded(nl.handle.link().set(link).execute())
        .await
        .map_err(|e| format!("set mtu {mtu} and up: {e}"))?;
    add_ipv6_nodad(&nl, index, addr, 128)
        .await
        .map_err(|e| format!("add address {addr}/128: {e}"))?;
    for (prefix, len) in routes {
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(*prefix, *len)
            .output_interface(index)
            .build();
        bounded(nl.handle.route().add(route).replace().execute())
            .await
            .map_err(|e| format!("add route {prefix}/{len}: {e}"))?;
    }
    // Stale routes: ours (protocol static, as `add` makes them) on this interface, for
    // prefixes no longer wanted.
    let dump = nl
        .handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute();
    let all: Vec<_> =
        match tokio::time::timeout(COMMAND_TIMEOUT, dump.try_collect::<Vec<_>>()).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(format!("list routes: {e}")),
            Err(_) => {
                return Err(format!(
                    "list routes: no netlink answer within {COMMAND_TIMEOUT:?}"
                ))
            }
        };
    for r in all {
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet6(d)) => Some(*d),
            _ => None,
        });
        let len = r.header.destination_prefix_length;
        let (Some(oif), Some(dst)) = (oif, dst) else {
            continue;
        };
        if oif != index || r.header.protocol != RouteProtocol::Static || len == 0 {
            continue;
        }
        if routes.contains(&(dst, len)) {
            continue;
        }
        bounded(nl.handle.route().del(r).execute())
            .await
            .map_err(|e| format!("delete stale route {dst}/{len}: {e}"))?;
    }
    Ok(())
}

/// The kind of the link `name` as rtnetlink reports it (`wireguard`, `tun`, `veth`...):
/// `Ok(None)` when there is no such link, `Ok(Some(None))` for a link without a kind
/// (a physical device).
pub async fn link_kind(name: &str) -> Result<Option<Option<String>>, String> {
    use rtnetlink::packet_route::link::{LinkAttribute, LinkInfo};
    let Ok(index) = nix::net::if_::if_nametoindex(name) else {
        return Ok(None);
    };
    let nl = Netlink::open()?;
    let mut links = nl.handle.link().get().match_index(index).execute();
    let msg = match tokio::time::timeout(COMMAND_TIMEOUT, links.try_next()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(e)) if is_errno(&e, nix::libc::ENODEV) => return Ok(None),
        Ok(Err(e)) => return Err(format!("get link {name}: {e}")),
        Err(_) => {
            return Err(format!(
                "get link {name}: no netlink answer within {COMMAND_TIMEOUT:?}"
            ))
        }
    };
    let kind = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.to_string()),
            _ => None,
        }),
        _ => None,
    });
    Ok(Some(kind))
}

/// Creates a kernel WireGuard link `name` (`ip link add <name> type wireguard`). Needs
/// root and the kernel's WireGuard (the `wireguard` module, loaded on demand by the
/// kernel when it can be): without it the kernel answers "Operation not supported".
pub async fn create_wireguard_link(name: &str) -> Result<(), String> {
    let nl = Netlink::open()?;
    bounded(
        nl.handle
            .link()
            .add(rtnetlink::LinkWireguard::new(name).build())
            .execute(),
    )
    .await
}

/// Removes the instance's rules and its tap (with addresses and routes). Idempotent.
pub async fn teardown(tap: &str) -> Result<(), NetworkError> {
    // The rules name the tap only by its name, so both go at once.
    let (rules, link) = tokio::join!(remove_rules(tap), delete_link(tap));
    rules?;
    link
}

pub(crate) async fn delete_link(tap: &str) -> Result<(), NetworkError> {
    let Ok(index) = nix::net::if_::if_nametoindex(tap) else {
        return Ok(());
    };
    let nl = Netlink::open().map_err(|m| command_error(tap, "netlink connection", m))?;
    let del = async {
        match nl.handle.link().del(index).execute().await {
            // Gone in between: that is what was asked.
            Err(e) if is_errno(&e, nix::libc::ENODEV) => Ok(()),
            other => other,
        }
    };
    bounded(del)
        .await
        .map_err(|m| command_error(tap, "delete", m))
}

async fn remove_rules(tap: &str) -> Result<(), NetworkError> {
    let fail = |step: &str| {
        let step = step.to_string();
        move |message: String| command_error(tap, &step, message)
    };
    let (inet, arp) = tokio::join!(nft_table(NFT_FAMILY), nft_table(ARP_FAMILY));
    let objects = inet
        .map_err(fail("list nftables table"))?
        .unwrap_or_default();
    let arp = arp.map_err(fail("list nftables arp table"))?;
    let arp = arp.as_deref().and_then(|o| arp_element(o, tap));
    let chain = objects.iter().any(|o| o["chain"]["name"] == tap);
    let element = has_element(&objects, NFT_MAP, tap);
    let chain_exists = |name: String| objects.iter().any(|o| o["chain"]["name"] == name);
    let ingress = Ingress {
        element: has_element(&objects, NFT_INGRESS_MAP, tap),
        chain: chain_exists(ingress_chain(tap)),
        host_element: has_element(&objects, NFT_HOST_MAP, tap),
        host_chain: chain_exists(host_chain(tap)),
    };
    if !chain
        && !element
        && arp.is_none()
        && !ingress.element
        && !ingress.chain
        && !ingress.host_element
        && !ingress.host_chain
    {
        return Ok(());
    }
    nft_apply(&removal_json(tap, element, chain, arp, ingress))
        .await
        .map_err(fail("remove nftables chain"))
}

/// Taps with the plfm prefix on this host (a netlink link dump).
pub async fn plfm_taps() -> Vec<String> {
    let Ok(nl) = Netlink::open() else {
        return Vec::new();
    };
    let dump = nl
        .handle
        .link()
        .get()
        .execute()
        .try_filter_map(|m| {
            let name = m.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            });
            futures_util::future::ready(Ok(name))
        })
        .try_collect::<Vec<String>>();
    let Ok(names) = bounded(dump).await else {
        return Vec::new();
    };
    names
        .into_iter()
        .filter(|n| n.starts_with(TAP_PREFIX) && n.len() == 15)
        .collect()
}

/// Removes plfm taps and rule chains that no instance in `owned` owns (start-up).
pub async fn remove_orphans(owned: &[String]) -> Vec<String> {
    let mut removed = Vec::new();
    for tap in plfm_taps().await {
        if !owned.contains(&tap) && teardown(&tap).await.is_ok() {
            removed.push(tap);
        }
    }
    let mut leftovers = Vec::new();
    if let Ok(Some(objects)) = nft_table(NFT_FAMILY).await {
        leftovers.extend(tap_chains(&objects));
    }
    if let Ok(Some(objects)) = nft_table(ARP_FAMILY).await {
        leftovers.extend(arp_taps(&objects));
    }
    for chain in leftovers {
        if !owned.contains(&chain)
            && !removed.contains(&chain)
            && remove_rules(&chain).await.is_ok()
        {
            removed.push(chain);
        }
    }
    removed
}

/// The interface of the default route, IPv6 first, then IPv4 (`/proc/net/ipv6_route`,
/// `/proc/net/route`): the uplink when the config names none. `None` without one.
pub fn default_route_interface() -> Option<String> {
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    default_route_in(&v6, &v4)
}

/// [`default_route_interface`] on the files' text.
fn default_route_in(ipv6_route: &str, route: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    const RTF_REJECT: u32 = 0x200;
    let v6 = ipv6_route.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
        let default = f[0].bytes().all(|b| b == b'0') && *f.get(1)? == "00";
        (default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0 && *f.get(9)? != "lo")
            .then(|| f[9].to_string())
    });
    v6.or_else(|| {
        route.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            (*f.get(1)? == "00000000" && *f.get(7)? == "00000000" && flags & RTF_UP != 0)
                .then(|| f[0].to_string())
        })
    })
}

/// Writes `value` to `/proc/sys/net/<key>`; the error names the file.
fn write_sysctl(key: &str, value: &str) -> Result<(), String> {
    let path = format!("/proc/sys/net/{key}");
    std::fs::write(&path, value).map_err(|e| format!("write {value} to {path}: {e}"))
}

/// Applies the node's policy at start (root): the forwarding it needs, and the base
/// chains refilled with its egress and overlay rules (so instances adopted after a
/// restart get them before any new tap is set up). The error names the step.
///
/// Forwarding, with egress on: IPv6 has no per-interface switch that routes (the
/// kernel forwards IPv6 only with `ipv6/conf/all/forwarding`), so that is set, and
/// the uplink's `accept_ra` goes from 1 to 2 so the host keeps taking router
/// advertisements there. IPv4 forwarding is per interface (the input interface's
/// `forwarding` decides): set on the uplink here and on each tap at its setup. (The
/// overlay sets IPv6 forwarding when its interface comes up:
/// [`configure_overlay_link`].)
pub async fn apply_policy(policy: &NetPolicy) -> Result<(), String> {
    if !is_root() {
        return Err("applying the network policy needs root (CAP_NET_ADMIN)".into());
    }
    if let Some(uplink) = &policy.egress_uplink {
        let ra = format!("ipv6/conf/{uplink}/accept_ra");
        let now = std::fs::read_to_string(format!("/proc/sys/net/{ra}")).unwrap_or_default();
        if now.trim() == "1" {
            write_sysctl(&ra, "2")?;
        }
        write_sysctl(&format!("ipv4/conf/{uplink}/forwarding"), "1")?;
        write_sysctl("ipv6/conf/all/forwarding", "1")?;
    }
    nft_apply(&json!({ "nftables": base_commands(policy) }))
        .await
        .map_err(|e| format!("nftables base rules: {e}"))
}

/// Parses the spec's overlay address.
pub fn parse_ipv6(s: &str) -> Result<Ipv6Addr, NetworkError> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V6(a)) => Ok(a),
        _ => Err(NetworkError::Invalid(format!(
            "network.overlay_ipv6 {s:?} is not an IPv6 address"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_15_bytes_with_the_prefix_and_deterministic() {
        let a = tap_name("web-1");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("plfm"));
        assert_eq!(a, tap_name("web-1"));
        assert_ne!(a, tap_name("web-2"));
    }

    #[test]
    fn ipv4_links_are_consecutive_30s_inside_the_pool() {
        let pool = Ipv4Addr::new(169, 254, 0, 0);
        let l = ipv4_link(pool, 16, 0).unwrap();
        assert_eq!(l.host, Ipv4Addr::new(169, 254, 0, 5));
        assert_eq!(l.guest, Ipv4Addr::new(169, 254, 0, 6));
        assert_eq!(ipv4_link_count(16), 16383);
        assert!(ipv4_link(pool, 16, 16382).is_some());
        assert!(ipv4_link(pool, 16, 16383).is_none());
    }

    fn plan_a() -> TapPlan {
        TapPlan {
            owner: None,
            instance_id: "a".into(),
            tap: tap_name("a"),
            mtu: 1420,
            ipv6: "fd00::2".parse().unwrap(),
            ipv4: ipv4_link(Ipv4Addr::new(169, 254, 0, 0), 16, 0),
            guest_mac: guest_mac("a"),
            ingress: vec![(Transport::Tcp, 8080), (Transport::Udp, 53)],
            health_port: Some(9000),
        }
    }

    fn commands(doc: &Value) -> Vec<Value> {
        doc["nftables"].as_array().cloned().unwrap()
    }

    /// Rules added to `chain`, as their expression lists.
    fn rules_in(doc: &Value, chain: &str) -> Vec<Value> {
        commands(doc)
            .iter()
            .filter(|c| c["add"]["rule"]["chain"] == chain)
            .map(|c| c["add"]["rule"]["expr"].clone())
            .collect()
    }

    #[test]
    fn rules_json_builds_the_base_objects_then_the_tap_chain_and_its_element() {
        let plan = plan_a();
        let tap = plan.tap.as_str();
        let doc = rules_json(&plan, &NetPolicy::default());
        let cmds = commands(&doc);
        // Every object is in table inet plfm or arp plfm (ARP is not seen by inet).
        for c in &cmds {
            let (_, obj) = c.as_object().unwrap().iter().next().unwrap();
            let (_, body) = obj.as_object().unwrap().iter().next().unwrap();
            assert!(body["family"] == "inet" || body["family"] == "arp", "{c}");
            if body.get("table").is_some() {
                assert_eq!(body["table"], "plfm", "{c}");
            } else {
                assert_eq!(body["name"], "plfm", "{c}");
            }
        }
        assert_eq!(
            cmds[0],
            json!({"add": {"table": {"family": "inet", "name": "plfm"}}})
        );
        assert_eq!(cmds[1]["add"]["map"]["type"], "ifname");
        assert_eq!(cmds[1]["add"]["map"]["map"], "verdict");
        assert_eq!(cmds[2]["add"]["map"]["name"], "ingress");
        assert_eq!(cmds[2]["add"]["map"]["map"], "verdict");
        assert_eq!(cmds[3]["add"]["map"]["name"], "host_ingress");
        assert_eq!(cmds[3]["add"]["map"]["map"], "verdict");
        let cmds = [&cmds[..2], &cmds[4..]].concat();
        let pre = &cmds[2]["add"]["chain"];
        assert_eq!(
            (&pre["name"], &pre["hook"], &pre["prio"], &pre["policy"]),
            (
                &json!("prerouting"),
                &json!("prerouting"),
                &json!(-150),
                &json!("accept")
            )
        );
        let input = &cmds[3]["add"]["chain"];
        assert_eq!(
            (
                &input["name"],
                &input["hook"],
                &input["prio"],
                &input["policy"]
            ),
            (
                &json!("input"),
                &json!("input"),
                &json!(0),
                &json!("accept")
            )
        );
        let forward = &cmds[4]["add"]["chain"];
        assert_eq!(
            (&forward["hook"], &forward["policy"]),
            (&json!("forward"), &json!("accept"))
        );
        // Base chains are refilled (flush before their rules), the tap chain too.
        let flushed: Vec<&Value> = cmds
            .iter()
            .filter_map(|c| c.get("flush").map(|f| &f["chain"]["name"]))
            .collect();
        let ingress = format!("{tap}-in");
        assert_eq!(
            flushed,
            vec![
                "prerouting",
                "input",
                "forward",
                "output",
                "postrouting",
                tap,
                &ingress,
                &format!("{tap}-host"),
                "input"
            ]
        );
        assert_eq!(rules_in(&doc, "prerouting").len(), 1);
        assert_eq!(rules_in(&doc, "prerouting")[0][0]["vmap"]["data"], "@taps");
        let inet_input: Vec<Value> = commands(&doc)
            .iter()
            .filter(|c| {
                c["add"]["rule"]["chain"] == "input" && c["add"]["rule"]["family"] == "inet"
            })
            .map(|c| c["add"]["rule"]["expr"].clone())
            .collect();
        assert_eq!(inet_input.len(), 4);
        let forward_rules = rules_in(&doc, "forward");
        assert_eq!(forward_rules.len(), 7);
        for (i, r) in inet_input.iter().chain(&forward_rules).enumerate() {
            if i == inet_input.len() + 4 {
                // The ingress dispatch: by the outgoing interface, through the map.
                assert_eq!(
                    r[0]["vmap"],
                    json!({"key": {"meta": {"key": "oifname"}}, "data": "@ingress"})
                );
                continue;
            }
            // The wildcard, not one tap: the base rules cover every tap.
            assert_eq!(r[0]["match"]["right"], "plfm*", "{r}");
        }
        assert_eq!(inet_input[3][1], json!({"drop": null}));
        // Forward: guests' established flows, then ingress (established, echo and
        // packet-too-big, the tap's ports, a counted drop), then the counted drop of
        // what a guest starts.
        assert_eq!(
            forward_rules[0][0]["match"]["left"]["meta"]["key"],
            "iifname"
        );
        for r in &forward_rules[1..4] {
            assert_eq!(r[0]["match"]["left"]["meta"]["key"], "oifname");
            assert_eq!(
                r.as_array().unwrap().last().unwrap(),
                &json!({"accept": null})
            );
        }
        assert_eq!(
            forward_rules[5][0]["match"]["left"]["meta"]["key"],
            "oifname"
        );
        assert_eq!(
            forward_rules[6][0]["match"]["left"]["meta"]["key"],
            "iifname"
        );
        for r in &forward_rules[5..] {
            assert_eq!(
                r.as_array().unwrap()[1..],
                [json!({"counter": null}), json!({"drop": null})]
            );
        }
        // The tap's ingress chain: its declared ports per protocol, then (implicit)
        // return to the counted drop; the map sends the tap's traffic there.
        assert_eq!(
            rules_in(&doc, &ingress),
            [
                json!([
                    {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": [8080]}}},
                    {"accept": null}
                ]),
                json!([
                    {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": {"set": [53]}}},
                    {"accept": null}
                ]),
            ]
        );
        let ingress_element = cmds
            .iter()
            .find(|c| c["add"]["element"]["name"] == "ingress")
            .unwrap();
        assert_eq!(
            ingress_element["add"]["element"]["elem"],
            json!([[tap, {"jump": {"target": ingress}}]])
        );
        // The host's own connections: the declared ports (the ingress chain), and the
        // health check's port; the output chain dispatches there and drops the rest.
        let host = format!("{tap}-host");
        assert_eq!(
            rules_in(&doc, &host),
            [
                json!([{"jump": {"target": ingress}}]),
                json!([
                    {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 9000}},
                    {"accept": null}
                ]),
            ]
        );
        let output = rules_in(&doc, "output");
        assert_eq!(output.len(), 4);
        assert_eq!(
            output[2][0]["vmap"],
            json!({"key": {"meta": {"key": "oifname"}}, "data": "@host_ingress"})
        );
        assert_eq!(
            output[3].as_array().unwrap()[1..],
            [json!({"counter": null}), json!({"drop": null})]
        );
        let host_element = cmds
            .iter()
            .find(|c| c["add"]["element"]["name"] == "host_ingress")
            .unwrap();
        assert_eq!(
            host_element["add"]["element"]["elem"],
            json!([[tap, {"jump": {"target": host}}]])
        );
        // No declared port: the chain is empty, nothing is let in.
        let closed = rules_json(
            &TapPlan {
                ingress: vec![],
                ..plan_a()
            },
            &NetPolicy::default(),
        );
        assert!(rules_in(&closed, &ingress).is_empty());
        let text = serde_json::to_string(&inet_input).unwrap();
        assert!(
            !text.contains("nd-redirect") && !text.contains("nd-router-advert"),
            "{text}"
        );

        let element = cmds
            .iter()
            .find(|c| c["add"]["element"]["name"] == "taps")
            .unwrap();
        assert_eq!(
            element["add"]["element"]["elem"],
            json!([[tap, {"jump": {"target": tap}}]])
        );
        let arp = cmds.last().unwrap();
        assert_eq!(arp["add"]["element"]["family"], "arp");
        assert_eq!(
            arp["add"]["element"]["elem"],
            json!([{"concat": [tap, "169.254.0.6"]}])
        );
    }

    #[test]
    fn tap_rules_return_only_the_instances_own_addresses_then_drop() {
        let plan = plan_a();
        let doc = rules_json(&plan, &NetPolicy::default());
        let rules = rules_in(&doc, &plan.tap);
        assert_eq!(rules.len(), 4);
        // Its own link-local address only, not any of fe80::/64.
        let ll = eui64_link_local(plan.guest_mac).to_string();
        assert_eq!(
            rules[0][0]["match"]["right"],
            json!({"set": ["fd00::2", ll]})
        );
        assert_eq!(rules[0][0]["match"]["left"]["payload"]["field"], "saddr");
        assert_eq!(rules[1][1]["match"]["right"], "::");
        assert_eq!(
            rules[2][0],
            json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "169.254.0.6"}})
        );
        assert_eq!(rules[3], json!([{"counter": null}, {"drop": null}]));
        for r in &rules[..3] {
            assert_eq!(
                r.as_array().unwrap().last().unwrap(),
                &json!({"return": null})
            );
        }

        // Without an IPv4 link there is no IPv4 source rule (IPv4 is dropped).
        let v6_only = TapPlan {
            ipv4: None,
            ..plan_a()
        };
        let doc = rules_json(&v6_only, &NetPolicy::default());
        assert_eq!(rules_in(&doc, &v6_only.tap).len(), 3);
        assert!(!doc.to_string().contains("169.254."));
        assert!(
            !commands(&doc)
                .iter()
                .any(|c| c["add"]["element"]["family"] == "arp"),
            "no ARP sender: every ARP from the tap is dropped"
        );
    }

    #[test]
    fn the_tap_name_appears_only_in_its_chain_rules_and_element() {
        let plan = plan_a();
        let tap = plan.tap.as_str();
        let doc = rules_json(&plan, &NetPolicy::default());
        let mut uses = 0;
        for c in commands(&doc) {
            let text = c.to_string();
            if !text.contains(tap) {
                continue;
            }
            uses += 1;
            let ingress = format!("{tap}-in");
            let host = format!("{tap}-host");
            let ok = c["add"]["chain"]["name"] == tap
                || c["add"]["chain"]["name"] == host
                || c["flush"]["chain"]["name"] == host
                || c["add"]["rule"]["chain"] == host
                || c["add"]["element"]["name"] == "host_ingress"
                || c["flush"]["chain"]["name"] == tap
                || c["add"]["rule"]["chain"] == tap
                || c["add"]["chain"]["name"] == ingress
                || c["flush"]["chain"]["name"] == ingress
                || c["add"]["rule"]["chain"] == ingress
                || c["add"]["element"]["name"] == "taps"
                || c["add"]["element"]["name"] == "ingress"
                || c["add"]["element"]["name"] == "senders";
            assert!(ok, "tap named outside its chain/element: {c}");
            // A rule names the tap only as its chain, never in a match.
            // (The host chain's jump names the ingress chain, as its target.)
            if c["add"]["rule"].is_object() && c["add"]["rule"]["chain"] != host {
                assert!(!c["add"]["rule"]["expr"].to_string().contains(tap), "{c}");
            }
        }
        // add chain, flush chain, 4 rules, the map element, the ARP sender element;
        // the ingress chain (add, flush, 2 rules) and its map element; the host chain
        // (add, flush, 2 rules) and its map element.
        assert_eq!(uses, 18);
        assert!(!base_commands(&NetPolicy::default())
            .iter()
            .any(|c| c.to_string().contains(tap)));
    }

    #[test]
    fn removal_deletes_what_exists_and_nothing_else() {
        let tap = tap_name("a");
        assert_eq!(
            removal_json(&tap, true, true, None, Ingress::default()),
            json!({"nftables": [
                {"delete": {"element": {"family": "inet", "table": "plfm", "name": "taps", "elem": [tap]}}},
                {"flush": {"chain": {"family": "inet", "table": "plfm", "name": tap}}},
                {"delete": {"chain": {"family": "inet", "table": "plfm", "name": tap}}},
            ]})
        );
        assert_eq!(
            commands(&removal_json(&tap, false, true, None, Ingress::default())).len(),
            2
        );
        assert_eq!(
            commands(&removal_json(&tap, true, false, None, Ingress::default())).len(),
            1
        );
        let arp = json!({"concat": [tap, "169.254.0.6"]});
        let doc = removal_json(&tap, false, false, Some(arp.clone()), Ingress::default());
        assert_eq!(
            commands(&doc),
            vec![
                json!({"delete": {"element": {"family": "arp", "table": "plfm", "name": "senders", "elem": [arp]}}})
            ]
        );
    }

    #[test]
    fn the_guest_link_local_address_is_the_eui64_of_its_mac() {
        let mac = [0x06, 0x00, 0x12, 0x34, 0x56, 0x78];
        assert_eq!(mac_string(mac), "06:00:12:34:56:78");
        assert_eq!(
            eui64_link_local(mac),
            "fe80::400:12ff:fe34:5678".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(guest_mac("web-1"), guest_mac("web-1"));
        assert_ne!(guest_mac("web-1"), guest_mac("web-2"));
        assert_eq!(
            guest_mac("x")[0] & 0x03,
            0x02,
            "locally administered unicast"
        );
    }

    #[test]
    fn listed_table_yields_tap_chains_and_elements() {
        let tap = tap_name("a");
        let listed: Value = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "plfm", "handle": 1}},
            {"map": {"family": "inet", "name": "taps", "table": "plfm", "type": "ifname",
                     "handle": 1, "map": "verdict",
                     "elem": [[tap, {"jump": {"target": tap}}]]}},
            {"chain": {"family": "inet", "table": "plfm", "name": "prerouting", "handle": 2}},
            {"chain": {"family": "inet", "table": "plfm", "name": tap, "handle": 9}},
            {"chain": {"family": "inet", "table": "plfm", "name": "plfmshort", "handle": 10}},
        ]});
        let objects = commands(&listed);
        assert_eq!(tap_chains(&objects), vec![tap.clone()]);
        assert!(has_element(&objects, NFT_MAP, &tap));
        assert!(!has_element(&objects, NFT_MAP, &tap_name("b")));
    }

    /// Egress and the overlay in the base chains: the guest's own flows to the overlay
    /// prefix through the overlay interface, to the world through the uplink except
    /// the blocked ranges, masqueraded there; without egress, no accept and an empty
    /// nat chain.
    #[test]
    fn egress_and_overlay_rules_follow_the_policy() {
        let policy = NetPolicy {
            egress_uplink: Some("up0".into()),
            overlay_interface: Some("plfm-wg0".into()),
            overlay_prefix: ("fd00::".parse().unwrap(), 16),
        };
        let doc = json!({ "nftables": base_commands(&policy) });
        let forward = rules_in(&doc, "forward");
        let n = forward.len();
        assert_eq!(n, 11, "{forward:#?}");
        // Every rule that matches taps by the wildcard excludes the overlay interface
        // (`plfm-wg0` matches `plfm*`).
        for chain in ["input", "forward", "output", "postrouting"] {
            for r in rules_in(&doc, chain) {
                if r[0]["match"]["right"] == "plfm*" {
                    let key = &r[0]["match"]["left"]["meta"]["key"];
                    assert_eq!(
                        r[1],
                        json!({"match": {"op": "!=", "left": {"meta": {"key": key}}, "right": "plfm-wg0"}}),
                        "{chain}: {r}"
                    );
                }
            }
        }
        // After ingress: overlay, uplink IPv6, uplink IPv4, the counted drop of what a
        // guest starts, then the counted drop of transit from the overlay.
        let overlay = &forward[n - 5];
        assert_eq!(overlay[0]["match"]["left"]["meta"]["key"], "iifname");
        assert_eq!(overlay[2]["match"]["right"], "plfm-wg0");
        assert_eq!(
            overlay[3]["match"]["right"],
            json!({"prefix": {"addr": "fd00::", "len": 16}})
        );
        for (rule, family) in [(&forward[n - 4], "ip6"), (&forward[n - 3], "ip")] {
            assert_eq!(rule[2]["match"]["right"], "up0", "{rule}");
            assert_eq!(rule[3]["match"]["op"], "!=", "{rule}");
            assert_eq!(rule[3]["match"]["left"]["payload"]["protocol"], family);
            assert_eq!(rule[4], json!({"accept": null}));
        }
        let v6_blocked = forward[n - 4][3]["match"]["right"]["set"].to_string();
        for p in ["fd00::", "fe80::", "ff00::"] {
            assert!(v6_blocked.contains(p), "{p} not blocked: {v6_blocked}");
        }
        let v4_blocked = forward[n - 3][3]["match"]["right"]["set"].to_string();
        for p in ["169.254.0.0", "127.0.0.0", "224.0.0.0"] {
            assert!(v4_blocked.contains(p), "{p} not blocked: {v4_blocked}");
        }
        assert_eq!(
            forward[n - 2].as_array().unwrap()[2..],
            [json!({"counter": null}), json!({"drop": null})]
        );
        assert_eq!(
            forward[n - 1],
            json!([
                {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "plfm-wg0"}},
                {"counter": null},
                {"drop": null}
            ])
        );
        assert_eq!(
            rules_in(&doc, "postrouting"),
            [json!([
                {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "plfm*"}},
                {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "plfm-wg0"}},
                {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up0"}},
                {"counter": null},
                {"masquerade": null}
            ])]
        );
        let nat = commands(&doc)
            .into_iter()
            .find(|c| c["add"]["chain"]["name"] == "postrouting")
            .unwrap();
        assert_eq!(nat["add"]["chain"]["type"], "nat");

        // Egress off, no overlay: nothing a guest starts is accepted.
        let doc = json!({ "nftables": base_commands(&NetPolicy::default()) });
        let forward = rules_in(&doc, "forward");
        assert_eq!(forward.len(), 7);
        assert!(!forward.iter().any(|r| r.to_string().contains("up0")));
        assert!(rules_in(&doc, "postrouting").is_empty());
    }

    #[test]
    fn the_default_route_interface_is_read_from_proc() {
        let v6 = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
fd000000000000000000000000000000 10 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001    eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd010000000000000000000000000001 00000400 00000001 00000000 00000003   up0
";
        let v4 = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth9\t00000000\t0101FEA9\t0003\t0\t0\t0\t00000000\t0\t0\t0
";
        assert_eq!(default_route_in(v6, v4).as_deref(), Some("up0"));
        // No IPv6 default (only the unreachable one on lo): the IPv4 one.
        let v6_none = v6.lines().take(2).collect::<Vec<_>>().join("\n");
        assert_eq!(default_route_in(&v6_none, v4).as_deref(), Some("eth9"));
        assert_eq!(default_route_in("", "Iface\tDestination\n"), None);
    }
}
