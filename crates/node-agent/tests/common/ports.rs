//! Loopback ports for a server that another process binds a moment later (an
//! agent's API, a registry). Picked below the kernel's ephemeral range
//! (`net.ipv4.ip_local_port_range`, 32768 and up by default), where every
//! `bind(127.0.0.1:0)` and every outgoing connection takes its port: a port chosen
//! there by binding port 0 could be taken by a concurrent test's server or client
//! between the pick and the other process's bind, and that agent never answered
//! (a `cp_contract` failure in CI). Below the range only other explicit picks
//! compete; within a process each call gets a new port, and each process starts
//! at its own place.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port this picker uses.
const LOW: u32 = 10_000;

/// The first port of the kernel's ephemeral range.
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A loopback TCP port that is free now and that no other call in this process
/// returned before (until the range wraps).
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let high = ephemeral_start().min(u32::from(u16::MAX));
    if high < LOW + 1_000 {
        // No room below the range (an unusual sysctl): the kernel's pick.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
    }
    let span = high - LOW;
    let start = std::process::id().wrapping_mul(7_919) % span;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = u16::try_from(port).expect("below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{high}");
}
