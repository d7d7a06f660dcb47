//! Prometheus metrics of the agent (DESIGN §10), in one registry served at
//! `GET /metrics`.
//!
//! This module owns metric definitions and encoding. It must not compute anything the
//! metrics describe: owners update them where the event happens. Every metric here
//! (and in [`crate::image::ImageMetrics`]) is listed in `docs/metrics.md`; a test
//! (`tests/cli_operator.rs`) scrapes a running agent and fails on any difference.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label: status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// Status name.
    pub status: &'static str,
}

/// Labels: status and reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// Status name.
    pub status: &'static str,
    /// Reason code, or `none`.
    pub reason: &'static str,
}

/// Label: what was rejected.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Kind.
    pub kind: &'static str,
}

/// Labels: control-plane endpoint and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `plan`, `status`, `heartbeat`, `secrets`, `logs`.
    pub endpoint: &'static str,
    /// `ok`, `http_4xx`, `http_5xx`, `error`.
    pub outcome: &'static str,
}

/// Label: control-plane endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// Endpoint.
    pub endpoint: &'static str,
}

/// Label: outcome of a certificate reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// Outcomes of a reload of the control-plane TLS material (the `outcome` label).
pub const RELOAD_OUTCOMES: [&str; 2] = ["ok", "error"];

/// Control-plane endpoints the agent calls (the `endpoint` label).
pub const CP_ENDPOINTS: [&str; 6] = ["plan", "status", "heartbeat", "secrets", "logs", "overlay"];
/// Outcomes of a control-plane request (the `outcome` label).
pub const CP_OUTCOMES: [&str; 4] = ["ok", "http_4xx", "http_5xx", "error"];
/// What a desired-state rejection is about (the `kind` label of `desired_rejected`).
pub const REJECTED_KINDS: [&str; 1] = ["assignment"];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// All agent metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Instances by current status.
    pub instances: Family<StatusLabel, Gauge>,
    /// Transitions by status and reason.
    pub transitions: Family<TransitionLabels, Counter>,
    /// Seconds from VMM start to ready.
    pub boot_duration: Histogram,
    /// Seconds one supervisor reconcile pass took.
    pub reconcile_duration: Histogram,
    /// Reports waiting in the outbox.
    pub outbox_depth: Gauge,
    /// Reports delivered.
    pub reports_delivered: Counter,
    /// Delivery errors.
    pub delivery_errors: Counter,
    /// Desired-state entries rejected (bad files, invalid specs).
    pub rejected: Family<KindLabel, Counter>,
    /// Actor panics caught by the supervisor.
    pub actor_panics: Counter,
    /// Transactions that persisted status changes (each one fsync).
    pub status_commits: Counter,
    /// Control-plane requests by endpoint and outcome.
    pub cp_requests: Family<RequestLabels, Counter>,
    /// Control-plane request latency by endpoint.
    pub cp_latency: HistogramFamily<EndpointLabel>,
    /// Seconds since the last plan was fetched successfully.
    pub plan_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Reports the control plane refused for good (4xx) and that were dropped.
    pub reports_dropped: Counter,
    /// Workload log lines shipped.
    pub log_lines_shipped: Counter,
    /// Workload log lines dropped (queue full, control plane down too long).
    pub log_lines_dropped: Counter,
    /// Reloads of the control-plane TLS material and token by outcome.
    pub cert_reloads: Family<OutcomeLabel, Counter>,
    /// Seconds until the client certificate in use expires (+Inf without one).
    pub cert_expiry_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Overlay applies and drift checks by outcome (`plfm_overlay_apply_total`; the
    /// overlay's gauges are computed from its snapshot, `crate::overlay::status`).
    pub overlay_apply: Family<OutcomeLabel, Counter>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        // The root has no prefix: the agent's own metrics are `plfm_agent_*`, other
        // modules add theirs with their own prefix (`plfm_image_*`).
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("plfm_agent");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            instances: Family::default(),
            transitions: Family::default(),
            boot_duration: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            reconcile_duration: Histogram::new(exponential_buckets(0.0001, 4.0, 12)),
            outbox_depth: Gauge::default(),
            reports_delivered: Counter::default(),
            delivery_errors: Counter::default(),
            rejected: Family::default(),
            actor_panics: Counter::default(),
            status_commits: Counter::default(),
            cp_requests: Family::default(),
            cp_latency: Family::new_with_constructor(latency_histogram),
            plan_age_seconds: Gauge::default(),
            reports_dropped: Counter::default(),
            log_lines_shipped: Counter::default(),
            log_lines_dropped: Counter::default(),
            cert_reloads: Family::default(),
            cert_expiry_seconds: Gauge::default(),
            overlay_apply: Family::default(),
        };
        m.cert_expiry_seconds.set(f64::INFINITY);
        registry.register("instances", "Instances by status", m.instances.clone());
        registry.register(
            "status_transitions",
            "Status transitions by status and reason",
            m.transitions.clone(),
        );
        registry.register(
            "boot_duration_seconds",
            "VMM start to ready",
            m.boot_duration.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "One reconcile pass",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "outbox_depth",
            "Status reports waiting for delivery",
            m.outbox_depth.clone(),
        );
        registry.register(
            "reports_delivered",
            "Status reports delivered",
            m.reports_delivered.clone(),
        );
        registry.register(
            "report_delivery_errors",
            "Failed delivery attempts",
            m.delivery_errors.clone(),
        );
        registry.register(
            "desired_rejected",
            "Desired-state entries rejected",
            m.rejected.clone(),
        );
        registry.register(
            "actor_panics",
            "Instance actor panics caught",
            m.actor_panics.clone(),
        );
        registry.register(
            "status_commits",
            "State store transactions that committed status changes",
            m.status_commits.clone(),
        );
        registry.register(
            "cp_requests",
            "Control-plane requests by endpoint and outcome (ok, http_4xx, http_5xx, error)",
            m.cp_requests.clone(),
        );
        registry.register(
            "cp_request_duration_seconds",
            "Control-plane request latency by endpoint",
            m.cp_latency.clone(),
        );
        registry.register(
            "plan_age_seconds",
            "Age of the last applied plan",
            m.plan_age_seconds.clone(),
        );
        registry.register(
            "reports_dropped",
            "Status reports the control plane refused for good (4xx) and that were dropped",
            m.reports_dropped.clone(),
        );
        registry.register(
            "log_lines_shipped",
            "Workload log lines delivered to the control plane",
            m.log_lines_shipped.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Workload log lines dropped (queue full or delivery gave up)",
            m.log_lines_dropped.clone(),
        );
        registry.register(
            "cert_reload",
            "Reloads of the control-plane CA, client certificate, key and token after their files changed, by outcome (ok, error)",
            m.cert_reloads.clone(),
        );
        registry.register(
            "cert_expiry_seconds",
            "Seconds until the control-plane client certificate in use expires (+Inf without one)",
            m.cert_expiry_seconds.clone(),
        );
        // Every label set that can occur starts at 0: a family without samples is left
        // out of the exposition, so a node that never talked to a control plane, or
        // never rejected an assignment, would otherwise not show these metrics at all
        // (and `rate()` over a series that appears at its first event misses it).
        for status in crate::instance::Status::ALL {
            let _ = m.instances.get_or_create(&StatusLabel {
                status: status.as_str(),
            });
        }
        for endpoint in CP_ENDPOINTS {
            let _ = m.cp_latency.get_or_create(&EndpointLabel { endpoint });
            for outcome in CP_OUTCOMES {
                let _ = m
                    .cp_requests
                    .get_or_create(&RequestLabels { endpoint, outcome });
            }
        }
        for outcome in RELOAD_OUTCOMES {
            let _ = m.cert_reloads.get_or_create(&OutcomeLabel { outcome });
        }
        for kind in REJECTED_KINDS {
            let _ = m.rejected.get_or_create(&KindLabel { kind });
        }
        let overlay = root.sub_registry_with_prefix("plfm_overlay");
        overlay.register(
            "apply",
            "Overlay configuration applies and drift checks by outcome (applied, unchanged, drift_repaired, error)",
            m.overlay_apply.clone(),
        );
        for outcome in crate::overlay::owner::APPLY_OUTCOMES {
            let _ = m.overlay_apply.get_or_create(&OutcomeLabel { outcome });
        }
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = root;
        m
    }

    /// Lets other modules (images, control plane) add their metrics.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Encoding into a String cannot fail for lack of space; an error here would be a
        // bug in a metric's encoder, and an empty page is the honest answer then.
        if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
