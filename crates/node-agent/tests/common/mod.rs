//! Shared test harness: a node on a temp data dir with the mock runtime and a manual
//! clock, plan builders, and condition waits with deadlines (never sleep-and-hope).
//!
//! Submodules, usable from any test or bench crate that includes `common`:
//! [`wait`] (the one poll loop, and `settle`), [`gate`] (the system-test gate) and
//! [`agent`] (the agent binary as a child process), [`ports`] (loopback ports for
//! servers in other processes).
#![allow(dead_code)]

pub mod agent;
pub mod gate;
pub mod ports;
pub mod wait;

pub use ports::free_port;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use plfm_node_agent::agent::{Node, NodeOptions};
use plfm_node_agent::clock::{Clock, ManualClock};
use plfm_node_agent::instance::Status;
use plfm_node_agent::runtime::mock::{MockConfig, MockRuntime};
use plfm_node_agent::secrets::{
    DirSecrets, RetryingSecrets, SecretMaterial, SecretsError, SecretsSource,
};
use plfm_node_agent::spec::{decode_assignment, Assignment, InstanceId, Plan};
use plfm_node_agent::status::outbox::LocalSink;
use plfm_node_agent::status::StatusReport;
use serde_json::{json, Value};

pub const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

pub fn id(s: &str) -> InstanceId {
    InstanceId::parse(s).unwrap()
}

/// An overlay address of an instance's own (`fd00::<hash>:<hash>` of its id): the agent
/// refuses two instances with one address on a node.
pub fn overlay_of(instance: &str) -> String {
    let h = instance.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("fd00::{:x}:{:x}", h >> 16, h & 0xffff)
}

/// A valid workload JSON.
pub fn workload(instance: &str, generation: i32) -> Value {
    json!({
        "spec_version": "v1",
        "instance_id": instance,
        "generation": generation,
        "image": {"ref": "127.0.0.1:5000/app:v1", "digest": DIGEST, "resolved_digest": DIGEST, "os": "linux", "arch": "amd64"},
        "command": ["/app"],
        "resources": {"cpu_request": 0.25, "memory_limit_bytes": 128 * 1024 * 1024},
        "network": {"overlay_ipv6": overlay_of(instance), "gateway_ipv6": "fe80::1"},
        "lifecycle": {"termination_grace_seconds": 5, "restart_policy": "always", "max_retries": 3}
    })
}

/// An assignment JSON (running).
pub fn assignment_json(instance: &str, generation: i32) -> Value {
    json!({"instance_id": instance, "generation": generation, "desired_state": "running", "drain_grace_seconds": 5, "workload": workload(instance, generation)})
}

pub fn decode(v: &Value) -> Assignment {
    decode_assignment(v, "test").unwrap()
}

pub fn assignment(instance: &str, generation: i32) -> Assignment {
    decode(&assignment_json(instance, generation))
}

pub fn plan(cursor: i64, assignments: Vec<Assignment>) -> Plan {
    Plan {
        cursor,
        assignments,
        rejected: Vec::new(),
    }
}

/// Standalone secrets from a directory, unreachable while `down` is set (a control
/// plane outage: every fetch fails as a connection failure would), retried as the
/// connected agent retries them.
pub struct OutageSecrets {
    inner: DirSecrets,
    pub down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl SecretsSource for OutageSecrets {
    async fn fetch(&self, version_id: &str) -> Result<SecretMaterial, SecretsError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(SecretsError::Fetch {
                version_id: version_id.to_string(),
                detail: "connection refused (test outage)".into(),
            });
        }
        self.inner.fetch(version_id).await
    }
}

/// A node with the mock runtime and a manual clock.
pub struct TestNode {
    pub node: Option<Node>,
    pub mock: Arc<MockRuntime>,
    pub clock: Arc<ManualClock>,
    /// The node's secrets source: set `secrets.down` for an outage.
    pub secrets: Arc<OutageSecrets>,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestNode {
    pub async fn start(mock: MockConfig) -> TestNode {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut t = TestNode::start_at(mock, dir).await;
        t._tmp = Some(tmp);
        t
    }

    /// A node whose data dir is `<dir>/data` (the caller owns `dir`).
    pub async fn start_at(mock: MockConfig, dir: PathBuf) -> TestNode {
        let clock = Arc::new(ManualClock::new());
        let mock = Arc::new(MockRuntime::new(mock, clock.clone(), None, None));
        let secrets = Arc::new(OutageSecrets {
            inner: DirSecrets::new(dir.join("desired/secrets")),
            down: false.into(),
        });
        let mut t = TestNode {
            node: None,
            mock,
            clock,
            secrets,
            dir,
            _tmp: None,
        };
        t.restart().await;
        t
    }

    /// (Re)starts the node on the same data dir and mock runtime (VMs survive, like
    /// detached VMM processes across an agent restart).
    pub async fn restart(&mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown(plfm_node_agent::config::ShutdownMode::Detach)
                .await;
        }
        std::fs::create_dir_all(self.dir.join("desired/secrets")).unwrap();
        let node = Node::start(NodeOptions {
            data_dir: self.dir.join("data"),
            runtime: self.mock.clone(),
            clock: self.clock.clone(),
            secrets: Arc::new(RetryingSecrets::new(
                self.secrets.clone(),
                self.clock.clone(),
            )),
            sink: Arc::new(LocalSink),
            boot_timeout: Duration::from_secs(30),
            max_instances: 20_000,
            metrics: std::sync::Arc::new(plfm_node_agent::metrics::Metrics::new()),
        })
        .await
        .unwrap();
        self.node = Some(node);
    }

    pub fn node(&self) -> &Node {
        self.node.as_ref().unwrap()
    }

    pub fn secrets_dir(&self) -> PathBuf {
        self.dir.join("desired/secrets")
    }

    pub async fn apply(&self, plan: Plan) {
        self.node().supervisor.apply(plan).await;
    }

    pub fn status(&self, instance: &str) -> Option<Status> {
        self.node().status.get(&id(instance)).map(|v| v.status)
    }

    /// Reports the local sink has taken for an instance, in order.
    pub fn reports(&self, instance: &str) -> Vec<StatusReport> {
        self.node()
            .store
            .delivered_reports(Some(instance))
            .unwrap()
            .into_iter()
            .map(|(_, _, j)| serde_json::from_str(&j).unwrap())
            .collect()
    }

    pub fn all_reports(&self) -> Vec<StatusReport> {
        self.node()
            .store
            .delivered_reports(None)
            .unwrap()
            .into_iter()
            .map(|(_, _, j)| serde_json::from_str(&j).unwrap())
            .collect()
    }

    /// Delivered + queued reports: everything ever reported.
    pub fn report_count(&self) -> i64 {
        let s = &self.node().store;
        s.delivered_count().unwrap() + s.outbox_depth().unwrap()
    }

    pub fn statuses_of(&self, instance: &str) -> Vec<Status> {
        self.reports(instance)
            .into_iter()
            .map(|r| r.status)
            .collect()
    }

    /// Waits (real time, 20 s deadline) for `cond`, advancing the manual clock by `step`
    /// between checks so backoffs and health intervals elapse.
    pub async fn wait_for(
        &self,
        what: &str,
        step: Duration,
        mut cond: impl FnMut(&TestNode) -> bool,
    ) {
        wait::Poll::within(Duration::from_secs(20))
            .every(Duration::from_millis(2))
            .until_async(what, || {
                if cond(self) {
                    return Ok(());
                }
                self.clock.advance(step);
                Err(Instances(self))
            })
            .await
    }

    /// Like [`TestNode::wait_for`], but the node runs until idle after every clock step
    /// (see [`wait::settle`]): when it returns, what `cond` waited for happened during
    /// the last step, so the clock is at most `step` past it.
    pub async fn step_until(
        &self,
        what: &str,
        step: Duration,
        mut cond: impl FnMut(&TestNode) -> bool,
    ) {
        wait::Poll::within(Duration::from_secs(20))
            .until_settled(
                what,
                || self.clock.advance(step),
                || {
                    if cond(self) {
                        Ok(())
                    } else {
                        Err(Instances(self))
                    }
                },
            )
            .await
    }

    /// Runs the node until it is idle (see [`wait::settle`]): whatever the test did so
    /// far has had every consequence it will have without more input.
    pub async fn settle(&self) {
        wait::settle().await
    }

    /// Waits until every report is delivered (outbox empty).
    pub async fn wait_delivered(&self) {
        self.wait_for("outbox to drain", Duration::ZERO, |t| {
            t.node().store.outbox_depth().unwrap() == 0
        })
        .await;
    }

    pub fn now_secs(&self) -> f64 {
        self.clock.now().0.as_secs_f64()
    }
}

/// The node's instances, listed only when a wait gives up.
struct Instances<'a>(&'a TestNode);

impl std::fmt::Debug for Instances<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "instances: {:#?}", self.0.node().status.list())
    }
}

/// Every file under `root` (relative paths), sorted.
pub fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Whether two consecutive *reported* statuses are legal: directly, or through the
/// internal `preparing` that reports never show (restarts: failed → booting).
pub fn reported_move_is_legal(a: Status, b: Status) -> bool {
    a.can_transition_to(b)
        || (a.can_transition_to(Status::Preparing) && Status::Preparing.can_transition_to(b))
}
