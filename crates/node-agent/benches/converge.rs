//! Benchmark: converge 10,000 instances from an empty node with the mock runtime at
//! zero latency, hold them through 60 steady-state reconcile ticks, then remove them
//! all. Prints time per direction, agent heap per idle instance (a counting global
//! allocator: live bytes after converging minus before building the plan), RSS, status
//! commits (fsyncs) and reports sent during the steady state.
//!
//! Run: `cargo bench -p plfm-node-agent --bench converge` (`-- 2000` for another count).

#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plfm_node_agent::agent::{Node, NodeOptions};
use plfm_node_agent::clock::SystemClock;
use plfm_node_agent::config::ShutdownMode;
use plfm_node_agent::instance::Status;
use plfm_node_agent::runtime::mock::{MockConfig, MockRuntime};
use plfm_node_agent::secrets::DirSecrets;
use plfm_node_agent::spec::{decode_assignment, Plan};
use plfm_node_agent::status::outbox::LocalSink;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with layout `l`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

fn plan(n: usize, cursor: i64) -> Plan {
    let assignments = (0..n)
        .map(|i| {
            let id = format!("inst-{i:05}");
            let v = serde_json::json!({
                "instance_id": id, "generation": 1, "desired_state": "running",
                "workload": {
                    "instance_id": id, "generation": 1,
                    "image": {"ref": "127.0.0.1:5000/app:v1", "resolved_digest": format!("sha256:{}", "b".repeat(64))},
                    "command": ["/app", "--serve"],
                    "env_vars": {"MODE": "bench"},
                    "resources": {"cpu_request": 0.1, "memory_limit_bytes": 134217728},
                    "network": {"overlay_ipv6": format!("fd00::{:x}", i + 1), "gateway_ipv6": "fe80::1"}
                }
            });
            decode_assignment(&v, "bench").expect("valid bench assignment")
        })
        .collect();
    Plan {
        cursor,
        assignments,
        rejected: Vec::new(),
    }
}

/// Waits for `cond`, checking every millisecond (the timings printed are this fine).
async fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    common::wait::Poll::within(timeout)
        .every(Duration::from_millis(1))
        .until_async(what, || common::wait::holds(cond()))
        .await
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(SystemClock::new());
        let mock = Arc::new(MockRuntime::new(
            MockConfig::instant(),
            clock.clone(),
            None,
            None,
        ));
        let node = Node::start(NodeOptions {
            data_dir: dir.path().join("data"),
            runtime: mock.clone(),
            clock,
            secrets: Arc::new(DirSecrets::new(dir.path().join("secrets"))),
            sink: Arc::new(LocalSink),
            boot_timeout: Duration::from_secs(60),
            max_instances: n + 1,
            metrics: std::sync::Arc::new(plfm_node_agent::metrics::Metrics::new()),
        })
        .await
        .expect("node");
        // Warm up allocator and SQLite caches with one instance, then measure.
        node.supervisor.apply(plan(1, 1)).await;
        wait("warm-up", Duration::from_secs(10), || {
            node.status.counts().get(&Status::Ready) == Some(&1)
        })
        .await;
        node.supervisor.apply(plan(0, 2)).await;
        wait("warm-up removal", Duration::from_secs(10), || {
            node.status.list().is_empty()
        })
        .await;
        wait("warm-up delivery", Duration::from_secs(10), || {
            node.store.outbox_depth().unwrap_or(1) == 0
        })
        .await;

        let heap0 = LIVE.load(Ordering::Relaxed);
        let rss0 = rss_kib();
        let commits0 = node.metrics.status_commits.get();
        let p = plan(n, 3);
        let t0 = Instant::now();
        node.supervisor.apply(p.clone()).await;
        wait("converge", Duration::from_secs(120), || {
            node.status.counts().get(&Status::Ready) == Some(&n)
        })
        .await;
        let up = t0.elapsed();
        wait("delivery", Duration::from_secs(120), || {
            node.store.outbox_depth().unwrap_or(1) == 0
        })
        .await;
        let up_delivered = t0.elapsed();
        let commits = node.metrics.status_commits.get() - commits0;
        // Idle: let actors park, then measure what the agent holds per instance.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let heap_idle = LIVE.load(Ordering::Relaxed).saturating_sub(heap0);
        let rss_idle = rss_kib().saturating_sub(rss0);

        let reports0 =
            node.store.delivered_count().unwrap_or(0) + node.store.outbox_depth().unwrap_or(0);
        let t_ticks = Instant::now();
        for tick in 0..60 {
            node.supervisor
                .apply(Plan {
                    cursor: 4 + tick,
                    ..p.clone()
                })
                .await;
        }
        let ticks = t_ticks.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reports1 =
            node.store.delivered_count().unwrap_or(0) + node.store.outbox_depth().unwrap_or(0);

        let t1 = Instant::now();
        node.supervisor.apply(plan(0, 100)).await;
        wait("removal", Duration::from_secs(120), || {
            node.status.list().is_empty() && mock.running().is_empty()
        })
        .await;
        let down = t1.elapsed();

        println!("converge benchmark, mock runtime at zero latency, {n} instances");
        println!(
            "  converge (apply -> all ready):        {:>8.1} ms",
            up.as_secs_f64() * 1e3
        );
        println!(
            "  converge incl. all reports delivered: {:>8.1} ms",
            up_delivered.as_secs_f64() * 1e3
        );
        println!(
            "  status commits (fsync'd transactions) for {} transitions: {commits}",
            3 * n
        );
        println!(
            "  agent heap per idle instance:         {:>8.0} B  ({:.1} KiB)",
            heap_idle as f64 / n as f64,
            heap_idle as f64 / n as f64 / 1024.0
        );
        println!(
            "  RSS growth per idle instance:         {:>8.0} B",
            rss_idle as f64 * 1024.0 / n as f64
        );
        println!(
            "  60 steady-state reconcile ticks:      {:>8.1} ms total, {:.2} ms/tick",
            ticks.as_secs_f64() * 1e3,
            ticks.as_secs_f64() * 1e3 / 60.0
        );
        println!(
            "  status reports sent in those ticks:   {:>8}",
            reports1 - reports0
        );
        println!(
            "  remove all (apply -> all stopped+gone): {:>6.1} ms",
            down.as_secs_f64() * 1e3
        );
        node.shutdown(ShutdownMode::Detach).await;
    });
}
