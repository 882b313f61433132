//! The job list across replicas that share a dir (`--shared-dir` with `--instance-name`):
//! each replica publishes its jobs' statuses to `{shared}/jobs/{instance}.json` every
//! second, and `GET /v1/jobs` on any replica merges the lists of the replicas alive. A
//! job itself is only ever answered by its owner (the proxy routes its id there); the
//! list is the one view that needs them all (docs/cluster.md).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::JobManager;

/// How often a replica publishes its list.
const PERIOD: Duration = Duration::from_secs(1);
/// A list older than this belongs to a replica that stopped: its jobs are not reachable
/// (their ids answer 503 at the proxy), so they are not listed.
const STALE: Duration = Duration::from_secs(10);

/// `{shared}/jobs/{instance}.json`.
#[derive(Serialize, Deserialize)]
struct Published {
    instance: String,
    updated_unix_ms: u64,
    jobs: Vec<serde_json::Value>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl JobManager {
    /// Where replicas publish their lists, when this one shares a dir under a name.
    fn published_dir(&self) -> Option<(PathBuf, &str)> {
        Some((self.config.shared_dir.as_ref()?.join("jobs"), self.config.instance_name.as_deref()?))
    }

    /// Publishes this replica's list every second until `stop`, then takes it back.
    pub async fn publish_list_loop(self: Arc<Self>, stop: CancellationToken) {
        let Some((dir, name)) = self.published_dir() else { return };
        let file = dir.join(format!("{name}.json"));
        loop {
            let list = Published { instance: name.to_string(), updated_unix_ms: now_ms(), jobs: self.own_statuses() };
            // Under a name of its own, then renamed: readers never see half a list.
            let tmp = dir.join(format!(".{name}.json.tmp"));
            let written = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&tmp, serde_json::to_vec(&list).unwrap_or_default())).and_then(|_| std::fs::rename(&tmp, &file));
            if let Err(e) = written {
                tracing::warn!(dir = %dir.display(), "cannot publish this replica's job list (GET /v1/jobs elsewhere will miss its jobs): {e}");
            }
            tokio::select! {
                _ = tokio::time::sleep(PERIOD) => {}
                _ = stop.cancelled() => break,
            }
        }
        // Drained: its jobs leave the cluster's list with it.
        let _ = std::fs::remove_file(&file);
    }

    fn own_statuses(&self) -> Vec<serde_json::Value> {
        self.list().iter().filter_map(|j| serde_json::to_value(j.status()).ok()).collect()
    }

    /// Every job of the replicas alive, newest first: this one's as they are now, the
    /// others' as they published them (at most a second old).
    pub fn cluster_list(&self) -> Vec<serde_json::Value> {
        let mut all = self.own_statuses();
        if let Some((dir, name)) = self.published_dir() {
            let fresh = now_ms().saturating_sub(STALE.as_millis() as u64);
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "json") || path.file_stem().is_some_and(|s| s == name) {
                    continue;
                }
                let Ok(list) = std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice::<Published>(&b).map_err(|e| e.to_string())) else { continue };
                if list.updated_unix_ms >= fresh {
                    all.extend(list.jobs);
                }
            }
        }
        let key = |v: &serde_json::Value| v["created_at"].as_str().unwrap_or_default().to_string();
        all.sort_by_key(|v| std::cmp::Reverse(key(v)));
        all
    }
}
