//! The job list across replicas that share a dir (`--shared-dir` with `--instance-name`):
//! each replica publishes its jobs' statuses to `{shared}/jobs/{instance}.json` every
//! second, and `GET /v1/jobs` on any replica merges the lists of the replicas alive. A
//! job itself is only ever answered by its owner (the proxy routes its id there); the
//! list is the one view that needs them all (docs/cluster.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::JobManager;

/// How often a replica publishes its list.
const PERIOD: Duration = Duration::from_secs(1);
/// A list older than this belongs to a replica that stopped: its jobs are not reachable
/// (their ids answer 503 at the proxy), so they are not listed.
const STALE: Duration = Duration::from_secs(10);

/// `{shared}/jobs/{instance}.json`; its modification time says the replica is alive.
#[derive(Serialize, Deserialize)]
struct Published {
    instance: String,
    jobs: Vec<serde_json::Value>,
}

/// Writes `bytes` as `file` (through a name of its own and a rename: readers never see
/// half a list), or, when they are what was written last, only marks the file fresh.
fn publish(file: &Path, bytes: &[u8], last: &mut Vec<u8>) -> std::io::Result<()> {
    if bytes == last.as_slice() && file.is_file() {
        return std::fs::File::options().write(true).open(file)?.set_modified(SystemTime::now());
    }
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)?;
    *last = bytes.to_vec();
    Ok(())
}

impl JobManager {
    /// Where replicas publish their lists, when this one shares a dir under a name.
    fn published_dir(&self) -> Option<(PathBuf, &str)> {
        Some((self.config.shared_dir.as_ref()?.join("jobs"), self.config.instance_name.as_deref()?))
    }

    /// Publishes this replica's list every second until `stop`, then takes it back.
    pub async fn publish_list_loop(self: Arc<Self>, stop: CancellationToken) {
        let Some((dir, name)) = self.published_dir() else { return };
        let file = Arc::new(dir.join(format!("{name}.json")));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), "cannot publish this replica's job list (GET /v1/jobs elsewhere will miss its jobs): {e}");
            return;
        }
        let last = Arc::new(std::sync::Mutex::new(Vec::new()));
        loop {
            let bytes = serde_json::to_vec(&Published { instance: name.to_string(), jobs: self.own_statuses() }).unwrap_or_default();
            // File work on a shared volume: off the runtime's threads.
            let (f, l) = (file.clone(), last.clone());
            let written = tokio::task::spawn_blocking(move || publish(&f, &bytes, &mut l.lock().unwrap_or_else(|e| e.into_inner()))).await;
            if let Ok(Err(e)) = written {
                tracing::warn!(dir = %dir.display(), "cannot publish this replica's job list (GET /v1/jobs elsewhere will miss its jobs): {e}");
            }
            tokio::select! {
                _ = tokio::time::sleep(PERIOD) => {}
                _ = stop.cancelled() => break,
            }
        }
        // Drained: its jobs leave the cluster's list with it.
        let _ = std::fs::remove_file(&*file);
    }

    fn own_statuses(&self) -> Vec<serde_json::Value> {
        self.list().iter().filter_map(|j| serde_json::to_value(j.status()).ok()).collect()
    }

    /// Every job of the replicas alive, newest first: this one's as they are now, the
    /// others' as they published them (at most a second old).
    pub fn cluster_list(&self) -> Vec<serde_json::Value> {
        let mut all = self.own_statuses();
        if let Some((dir, name)) = self.published_dir() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "json") || path.file_stem().is_some_and(|s| s == name) {
                    continue;
                }
                let alive = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age < STALE);
                if let Some(list) = alive.then(|| std::fs::read(&path).ok()).flatten().and_then(|b| serde_json::from_slice::<Published>(&b).ok()) {
                    all.extend(list.jobs);
                }
            }
        }
        all.sort_by_cached_key(|v| std::cmp::Reverse(v["created_at"].as_str().unwrap_or_default().to_string()));
        all
    }
}
