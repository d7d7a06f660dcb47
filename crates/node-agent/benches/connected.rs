//! Benchmark: one agent with 1,000 instances against an in-process control plane on
//! loopback (the same one the tests use). Prints (1) the time until the 2,000 reports of
//! 1,000 booting instances (booting, ready) are accepted, and (2) over one hour of
//! simulated steady state on an injected clock, the status reports sent (target 0) and
//! the heartbeats sent (target: one per `next_heartbeat_secs` = 10 s, i.e. 360).
//!
//! Run: `cargo bench -p plfm-node-agent --bench connected`

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/control_plane.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wait::{holds, Poll};
use plfm_node_agent::agent::{Node, NodeOptions};
use plfm_node_agent::clock::{ManualClock, SharedClock};
use plfm_node_agent::config::{Config, ShutdownMode};
use plfm_node_agent::control_plane::http::{
    run_heartbeat, run_plan_poller, ControlPlaneClient, HttpSink,
};
use plfm_node_agent::control_plane::secrets::http_secrets;
use plfm_node_agent::metrics::Metrics;
use plfm_node_agent::runtime::mock::{MockConfig, MockRuntime};

const NODE: &str = "bench-node";

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let cp = support::FakeCp::start(support::new_state(NODE, 10, None)).await;
        cp.set_plan(1, (0..n).map(|i| common::assignment_json(&format!("c{i:04}"), 1)).collect());
        let text = format!(
            "node_id = \"{NODE}\"\ndata_dir = \"/tmp/unused\"\n[control_plane]\nmode = \"http\"\nurl = \"{}\"\npoll_interval_ms = 5000\nheartbeat_interval_secs = 10\n[runtime]\nkind = \"mock\"\n",
            cp.url("http")
        );
        let cfg = Config::from_toml(&text, "bench", Path::new("/"), std::iter::empty()).expect("config");
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new());
        let shared: SharedClock = clock.clone();
        let metrics = Arc::new(Metrics::new());
        let client = Arc::new(ControlPlaneClient::new(&cfg.control_plane, NODE, metrics.clone()).expect("client"));
        let mock = Arc::new(MockRuntime::new(MockConfig::instant(), shared.clone(), None, None));
        let node = Node::start(NodeOptions {
            data_dir: dir.path().join("data"),
            runtime: mock.clone(),
            clock: shared.clone(),
            secrets: Arc::new(http_secrets(client.clone(), shared.clone())),
            sink: Arc::new(HttpSink::new(client.clone(), metrics.clone())),
            boot_timeout: Duration::from_secs(60),
            max_instances: n + 1,
            metrics: metrics.clone(),
        })
        .await
        .expect("node");
        let (stop, rx) = tokio::sync::watch::channel(false);
        let t0 = Instant::now();
        let poller = tokio::spawn(run_plan_poller(
            client.clone(),
            node.supervisor.clone(),
            node.store.clone(),
            shared.clone(),
            Duration::from_secs(5),
            node.status.subscribe_changes(),
            metrics.clone(),
            rx.clone(),
        ));
        let hb = tokio::spawn(run_heartbeat(client.clone(), node.supervisor.clone(), node.store.clone(), shared.clone(), NODE.into(), Duration::from_secs(10), 0, Default::default(), rx));
        Poll::within(Duration::from_secs(120))
            .every(Duration::from_millis(1))
            .until_async("every boot report accepted", || {
                let accepted = cp.accepted().len();
                if accepted >= 2 * n { Ok(()) } else { Err(format!("{accepted} of {} accepted", 2 * n)) }
            })
            .await;
        let boot_delivery = t0.elapsed();
        cp.check_delivery_log();

        // One hour of steady state on the injected clock, in 1 s steps.
        let posts0 = cp.posts().len();
        let hb0 = cp.state.heartbeats.lock().unwrap().len();
        let t1 = Instant::now();
        for _ in 0..3600 {
            clock.advance(Duration::from_secs(1));
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        // Let the beat due at exactly 3600 s land (up to 2 s of real time).
        let _ = Poll::within(Duration::from_secs(2))
            .try_until_async(|| holds(cp.state.heartbeats.lock().unwrap().len() - hb0 >= 360))
            .await;
        let simulated = t1.elapsed();
        let posts = cp.posts().len() - posts0;
        let heartbeats = cp.state.heartbeats.lock().unwrap().len() - hb0;

        println!("connected benchmark, mock runtime at zero latency, {n} instances, control plane on loopback");
        println!("  {n} instances booting -> {} reports accepted: {:>8.1} ms", 2 * n, boot_delivery.as_secs_f64() * 1e3);
        println!("  1 h simulated steady state (injected clock, {:.1} s real):", simulated.as_secs_f64());
        println!("    status reports sent:  {posts} (target 0)");
        println!("    heartbeats sent:      {heartbeats} (target 360 at next_heartbeat_secs = 10)");
        let _ = stop.send(true);
        let _ = poller.await;
        let _ = hb.await;
        node.shutdown(ShutdownMode::Detach).await;
    });
}
