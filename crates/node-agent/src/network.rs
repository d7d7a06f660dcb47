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
//! rules and is idempotent. Everything is done with the `ip` and `nft` binaries, each
//! call bounded by [`COMMAND_TIMEOUT`].
//!
//! nftables: table `inet plfm`, a `prerouting` base chain that dispatches
//! `iifname vmap @taps` to one regular chain per tap (named like the tap) which drops
//! packets whose source is not the instance's own addresses; an `input` base chain that
//! lets a tap reach the host only for established flows, ICMP/ICMPv6 (neighbour
//! discovery) and nothing else. This module must not decide lifecycle or log secrets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

/// Prefix of every tap the agent creates.
pub const TAP_PREFIX: &str = "plfm";

/// Longest a single `ip`/`nft` call may take.
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
/// Two processes, run at once: one `ip -batch` for the tap, MTU, `fe80::1`, the /128
/// route and the IPv4 link address, and one atomic `nft -f` script for the rules (they
/// name the tap, so they need not wait for it).
pub async fn setup(plan: &TapPlan, owned: bool) -> Result<(), NetworkError> {
    let tap = plan.tap.as_str();
    let fail = |step: &str| {
        let tap = tap.to_string();
        let step = step.to_string();
        move |message: String| NetworkError::Command { tap, step, message }
    };
    if !is_root() {
        return Err(NetworkError::NotRoot(tap.into()));
    }
    if !(576..=65535).contains(&plan.mtu) {
        return Err(NetworkError::Invalid(format!(
            "tap {tap}: mtu {} out of range 576..=65535",
            plan.mtu
        )));
    }
    let mut batch = String::new();
    if link_exists(tap).await {
        if !owned {
            return Err(NetworkError::Collision {
                tap: tap.into(),
                instance_id: plan.instance_id.clone(),
            });
        }
    } else {
        batch.push_str(&format!("tuntap add dev {tap} mode tap\n"));
    }
    batch.push_str(&format!(
        "link set dev {tap} mtu {} up\naddr replace {HOST_LINK_LOCAL}/64 dev {tap} nodad\nroute replace {}/128 dev {tap}\n",
        plan.mtu, plan.ipv6
    ));
    if let Some(v4) = plan.ipv4 {
        batch.push_str(&format!("addr replace {}/30 dev {tap}\n", v4.host));
    }
    let rules = rules_script(plan);
    let (links, nft) = tokio::join!(
        run("ip", &["-batch", "-"], Some(&batch)),
        run("nft", &["-f", "-"], Some(&rules))
    );
    links.map_err(fail("create tap, addresses and route"))?;
    nft.map_err(fail("nftables rules"))?;
    Ok(())
}

/// The base table and chains (idempotent: `add` of existing objects is a no-op).
fn base_script() -> String {
    format!(
        "add table inet plfm
add map inet plfm taps {{ type ifname : verdict; }}
add chain inet plfm prerouting {{ type filter hook prerouting priority -150; policy accept; }}
add chain inet plfm input {{ type filter hook input priority 0; policy accept; }}
flush chain inet plfm prerouting
flush chain inet plfm input
add rule inet plfm prerouting iifname vmap @taps
add rule inet plfm input iifname \"{TAP_PREFIX}*\" ct state established,related accept
add rule inet plfm input iifname \"{TAP_PREFIX}*\" meta l4proto {{ icmp, ipv6-icmp }} accept
add rule inet plfm input iifname \"{TAP_PREFIX}*\" drop
"
    )
}

/// Rules of one instance: only its own source addresses leave its tap.
fn rules_script(plan: &TapPlan) -> String {
    let tap = &plan.tap;
    let mut s = base_script();
    s.push_str(&format!(
        "add chain inet plfm {tap}
flush chain inet plfm {tap}
add rule inet plfm {tap} ip6 saddr {{ {}, fe80::/64 }} return
add rule inet plfm {tap} meta nfproto ipv6 ip6 saddr :: icmpv6 type {{ nd-neighbor-solicit, nd-router-solicit, mld2-listener-report }} return
",
        plan.ipv6
    ));
    if let Some(v4) = plan.ipv4 {
        s.push_str(&format!(
            "add rule inet plfm {tap} ip saddr {} return\n",
            v4.guest
        ));
    }
    s.push_str(&format!(
        "add rule inet plfm {tap} meta protocol arp return
add rule inet plfm {tap} drop
add element inet plfm taps {{ \"{tap}\" : jump {tap} }}
"
    ));
    s
}

/// Removes the instance's rules and its tap (with addresses and routes). Idempotent.
pub async fn teardown(tap: &str) -> Result<(), NetworkError> {
    remove_rules(tap).await?;
    if link_exists(tap).await {
        run("ip", &["link", "del", "dev", tap], None)
            .await
            .map_err(|message| NetworkError::Command {
                tap: tap.into(),
                step: "delete".into(),
                message,
            })?;
    }
    Ok(())
}

async fn remove_rules(tap: &str) -> Result<(), NetworkError> {
    if run("nft", &["list", "chain", "inet", "plfm", tap], None)
        .await
        .is_err()
    {
        return Ok(());
    }
    let _ = run(
        "nft",
        &[
            "delete",
            "element",
            "inet",
            "plfm",
            "taps",
            &format!("{{ \"{tap}\" }}"),
        ],
        None,
    )
    .await;
    let script = format!("flush chain inet plfm {tap}\ndelete chain inet plfm {tap}\n");
    run("nft", &["-f", "-"], Some(&script))
        .await
        .map_err(|message| NetworkError::Command {
            tap: tap.into(),
            step: "remove nftables chain".into(),
            message,
        })?;
    Ok(())
}

/// Taps with the plfm prefix on this host.
pub async fn plfm_taps() -> Vec<String> {
    let Ok(out) = run("ip", &["-o", "link", "show"], None).await else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
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
    if let Ok(out) = run("nft", &["list", "table", "inet", "plfm"], None).await {
        for chain in out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("chain "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| c.starts_with(TAP_PREFIX) && c.len() == 15)
        {
            if !owned.iter().any(|o| o == chain) && remove_rules(chain).await.is_ok() {
                removed.push(chain.to_string());
            }
        }
    }
    removed
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

    #[test]
    fn rules_name_the_tap_and_its_addresses() {
        let plan = TapPlan {
            instance_id: "a".into(),
            tap: tap_name("a"),
            mtu: 1420,
            ipv6: "fd00::2".parse().unwrap(),
            ipv4: ipv4_link(Ipv4Addr::new(169, 254, 0, 0), 16, 0),
        };
        let s = rules_script(&plan);
        assert!(s.contains("ip6 saddr { fd00::2, fe80::/64 } return"));
        assert!(s.contains("ip saddr 169.254.0.6 return"));
        assert!(s.contains(&format!("jump {}", plan.tap)));
    }
}
