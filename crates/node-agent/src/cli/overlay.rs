//! `overlay [--json]`: the node's WireGuard overlay as the agent's owner last saw it
//! (`GET /v1/overlay`): interface, backend, public key, listen port, overlay address,
//! generation, and one row per peer with its endpoint, allowed IPs, last handshake and
//! byte counters; refused peers and the last errors below. `--json` prints the API's
//! object (the DESIGN §8a field names).
//!
//! This module formats; the agent computes.

use crate::overlay::status::{OverlayState, OverlayView};

use super::Api;

/// `overlay [--json]`.
pub async fn overlay(api: &Api, json: bool) -> anyhow::Result<()> {
    let body = api.send(api.get("/v1/overlay"), "overlay").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let view: OverlayView = serde_json::from_value(body)
        .map_err(|e| anyhow::anyhow!("overlay: unexpected answer: {e}"))?;
    print!("{}", render(&view));
    Ok(())
}

fn state_str(s: OverlayState) -> &'static str {
    match s {
        OverlayState::Disabled => "disabled",
        OverlayState::Off => "off",
        OverlayState::On => "on",
    }
}

/// Seconds as `42s`, `5m`, `3h`, `2d`.
fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The human form of the overlay.
pub fn render(v: &OverlayView) -> String {
    let dash = || "-".to_string();
    let mut out = format!(
        "OVERLAY {} ({}) {}",
        v.interface,
        v.backend,
        state_str(v.state)
    );
    if let Some(g) = v.generation {
        out.push_str(&format!("  generation {g}"));
    }
    out.push('\n');
    out.push_str(&format!(
        "  public key  {}\n",
        v.public_key.clone().unwrap_or_else(dash)
    ));
    if v.state == OverlayState::On {
        out.push_str(&format!(
            "  address     {}  listen port {}\n",
            v.node_overlay_ipv6.clone().unwrap_or_else(dash),
            v.listen_port.map(|p| p.to_string()).unwrap_or_else(dash)
        ));
    }
    if let Some(s) = &v.source {
        out.push_str(&format!("  source      {s}\n"));
    }
    if let Some(r) = &v.off_reason {
        out.push_str(&format!("  off: {r}\n"));
    }
    if !v.peers.is_empty() {
        out.push_str(&format!(
            "\n{:<20} {:<44} {:<28} {:>9} {:>12} {:>12}  {}\n",
            "NODE", "PUBLIC KEY", "ENDPOINT", "HANDSHAKE", "RX", "TX", "ALLOWED IPS"
        ));
        for p in &v.peers {
            out.push_str(&format!(
                "{:<20} {:<44} {:<28} {:>9} {:>12} {:>12}  {}\n",
                p.node_id,
                p.public_key,
                p.endpoint.clone().unwrap_or_else(dash),
                p.last_handshake_age_secs
                    .map(|a| format!("{} ago", age(a)))
                    .unwrap_or_else(|| "never".into()),
                p.rx_bytes,
                p.tx_bytes,
                p.allowed_ips.join(",")
            ));
        }
    }
    for r in &v.refused {
        out.push_str(&format!("REFUSED {r}\n"));
    }
    if let Some(e) = &v.last_apply_error {
        out.push_str(&format!(
            "APPLY FAILED (retried at the next drift check): {e}\n"
        ));
    }
    if let Some(e) = &v.last_source_error {
        out.push_str(&format!("SOURCE: {e}\n"));
    }
    out
}

/// One line below `status`'s table.
pub fn status_line(v: &serde_json::Value) -> String {
    let peers = v["peers"].as_array().map(|p| p.len()).unwrap_or(0);
    let mut out = format!(
        "OVERLAY {} {}",
        v["interface"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    );
    if v["state"] == "on" {
        out.push_str(&format!(
            "  generation {}  {peers} peers",
            v["generation"].as_i64().unwrap_or(0)
        ));
    }
    if let Some(e) = v["last_apply_error"].as_str() {
        out.push_str(&format!("  APPLY FAILED: {e}"));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::status::{view_at, PeerSnapshot, Snapshot};

    #[test]
    fn the_table_shows_each_peer_and_the_problems() {
        let mut s = Snapshot::initial("plfm-wg0", "userspace", Some("PUB=".into()));
        s.state = OverlayState::On;
        s.generation = Some(7);
        s.listen_port = Some(51820);
        s.node_overlay_ipv6 = Some("fd00::1".into());
        s.peers = vec![PeerSnapshot {
            node_id: "node-2".into(),
            public_key: "KEY2=".into(),
            endpoint: Some("[fd00:ffff::2]:51820".into()),
            allowed_ips: vec!["fd00::2/128".into()],
            last_handshake_unix: 990,
            rx_bytes: 123,
            tx_bytes: 456,
        }];
        s.last_apply_error = Some("wireguard-go: not found".into());
        let text = render(&view_at(&s, 1000));
        for want in [
            "OVERLAY plfm-wg0 (userspace) on  generation 7",
            "public key  PUB=",
            "fd00::1  listen port 51820",
            "node-2",
            "10s ago",
            "123",
            "fd00::2/128",
            "APPLY FAILED",
        ] {
            assert!(text.contains(want), "{want:?} missing:\n{text}");
        }
        let line = status_line(&serde_json::to_value(view_at(&s, 1000)).unwrap());
        assert!(line.contains("generation 7  1 peers"), "{line}");
    }
}
