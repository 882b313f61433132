//! What every handler can reach ([`AppState`]) and the readiness it reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use super::auth;
use crate::collector::CollectorHandle;
use crate::config::Config;
use crate::metrics::Metrics;

/// Result of the backend's readiness probe: `Ok(description)` or `Err(what is missing)`.
pub type BackendStatus = Arc<std::sync::RwLock<Result<String, String>>>;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub collector: CollectorHandle,
    pub backend_status: BackendStatus,
    /// Set on SIGTERM: /readyz turns 503 so load balancers stop sending work.
    pub draining: Arc<AtomicBool>,
    /// Whether spans are exported (for diagnostics).
    pub exporting: bool,
    pub jobs: Arc<crate::jobs::JobManager>,
    /// Bearer tokens for `/v1/*`; empty: no auth.
    pub auth: auth::Tokens,
}

/// One condition of readiness. The serialized name is part of `/readyz`'s contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// The resource collector has taken its first sample.
    Collector,
    /// The backend's readiness probe passed.
    Backend,
    /// The realtime workers answer (only where workers are configured).
    RealtimeWorkers,
    /// Not draining.
    Accepting,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Collector => "collector",
            Check::Backend => "backend",
            Check::RealtimeWorkers => "realtime_workers",
            Check::Accepting => "accepting",
        }
    }

    /// How the status page names it.
    pub fn label(self) -> &'static str {
        match self {
            Check::Collector => "Resource collector",
            Check::Backend => "Backend",
            Check::RealtimeWorkers => "Realtime workers",
            Check::Accepting => "Accepting jobs",
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    pub ready: bool,
    /// Each condition and whether it holds.
    pub checks: Vec<ReadinessCheck>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReadinessCheck {
    /// `collector`, `backend`, `realtime_workers` (realtime workers only) or `accepting`.
    pub name: Check,
    pub ok: bool,
    pub detail: String,
}

impl AppState {
    pub fn readiness(&self) -> Readiness {
        let mut checks = Vec::new();
        let sampled = self.collector.has_sample();
        checks.push(ReadinessCheck {
            name: Check::Collector,
            ok: sampled,
            detail: if sampled { "first resource sample taken".into() } else { "waiting for the first resource sample".into() },
        });
        let backend = self.backend_status.read().unwrap_or_else(|e| e.into_inner()).clone();
        checks.push(ReadinessCheck {
            name: Check::Backend,
            ok: backend.is_ok(),
            detail: match backend {
                Ok(d) => format!("{} backend usable: {d}", self.config.backend.as_str()),
                Err(e) => format!("{} backend not usable: {e}", self.config.backend.as_str()),
            },
        });
        // Realtime workers count only where they exist (preview needs none; off: not asked).
        let rt = self.jobs.realtime();
        if rt.enabled() && rt.has_workers() {
            let r = rt.readiness();
            let mut detail = r.as_ref().map_or_else(|e| e.clone(), |d| d.clone());
            // Not a readiness condition (jobs run unprofiled), but said where operators look.
            if let Err(why) = self.jobs.profiler().attach_permitted() {
                detail.push_str(&format!("; {why}"));
            }
            checks.push(ReadinessCheck { name: Check::RealtimeWorkers, ok: r.is_ok(), detail });
        }
        let draining = self.draining.load(Ordering::Acquire);
        checks.push(ReadinessCheck {
            name: Check::Accepting,
            ok: !draining,
            detail: if draining { "shutting down: draining jobs".into() } else { "accepting jobs".into() },
        });
        Readiness { ready: checks.iter().all(|c| c.ok), checks }
    }
}
