//! Avatars for realtime mode: a validated source video plus the engine's prepared material.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::pipeline::MediaInfo;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AvatarState {
    Preparing,
    Ready,
    Failed,
}

/// One avatar: `data/avatars/{id}/` holds `source.{ext}` and `material/`.
#[derive(Debug)]
pub struct Avatar {
    pub id: String,
    pub dir: PathBuf,
    pub video: PathBuf,
    pub video_info: MediaInfo,
    pub bbox_shift: Option<i32>,
    pub created: SystemTime,
    /// The job that prepares it (its progress and report).
    pub prepare_job: String,
    state: Mutex<(AvatarState, Option<String>)>,
}

/// What `GET /v1/avatars` lists.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AvatarInfo {
    pub avatar_id: String,
    pub state: AvatarState,
    pub error: Option<String>,
    pub prepare_job_id: String,
    pub created_at: String,
    pub video_seconds: f64,
    pub video_frames: Option<u64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

impl Avatar {
    pub fn material_dir(&self) -> PathBuf {
        self.dir.join("material")
    }

    pub fn state(&self) -> AvatarState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    pub fn set_state(&self, s: AvatarState, error: Option<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (s, error);
    }

    pub fn info(&self) -> AvatarInfo {
        let (state, error) = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        AvatarInfo {
            avatar_id: self.id.clone(),
            state,
            error,
            prepare_job_id: self.prepare_job.clone(),
            created_at: humantime::format_rfc3339_millis(self.created).to_string(),
            video_seconds: self.video_info.duration_secs,
            video_frames: self.video_info.frames,
            width: self.video_info.width,
            height: self.video_info.height,
        }
    }
}

/// Why an avatar operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AvatarError {
    #[error("avatar `{0}` already exists; DELETE it first to re-create it")]
    Exists(String),
    #[error("no avatar `{0}`; POST /v1/avatars prepares one")]
    NotFound(String),
    #[error("avatar `{0}` is still being prepared; retry when GET /v1/avatars shows it ready")]
    Preparing(String),
    #[error("avatar `{id}` failed to prepare: {why}; DELETE it and prepare it again")]
    Failed { id: String, why: String },
}

/// Avatars by id. Reservation happens before the upload, so two requests for one id
/// cannot both win.
#[derive(Default)]
pub struct AvatarStore {
    map: Mutex<HashMap<String, Arc<Avatar>>>,
    reserved: Mutex<std::collections::HashSet<String>>,
}

impl AvatarStore {
    /// Reserves `id` while its video uploads. `Err` if it exists or is being uploaded.
    pub fn reserve(&self, id: &str) -> Result<(), AvatarError> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(id) || !reserved.insert(id.to_string()) {
            return Err(AvatarError::Exists(id.to_string()));
        }
        Ok(())
    }

    pub fn unreserve(&self, id: &str) {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// Turns a reservation into an avatar in `preparing`.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(&self, id: &str, dir: PathBuf, video: PathBuf, video_info: MediaInfo, bbox_shift: Option<i32>, prepare_job: String) -> Arc<Avatar> {
        let a = Arc::new(Avatar {
            id: id.to_string(),
            dir,
            video,
            video_info,
            bbox_shift,
            created: SystemTime::now(),
            prepare_job,
            state: Mutex::new((AvatarState::Preparing, None)),
        });
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string(), a.clone());
        self.unreserve(id);
        a
    }

    pub fn get(&self, id: &str) -> Result<Arc<Avatar>, AvatarError> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned().ok_or_else(|| AvatarError::NotFound(id.to_string()))
    }

    /// The avatar if it is ready to speak.
    pub fn ready(&self, id: &str) -> Result<Arc<Avatar>, AvatarError> {
        let a = self.get(id)?;
        let (state, error) = a.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match state {
            AvatarState::Ready => Ok(a),
            AvatarState::Preparing => Err(AvatarError::Preparing(id.to_string())),
            AvatarState::Failed => Err(AvatarError::Failed { id: id.to_string(), why: error.unwrap_or_default() }),
        }
    }

    pub fn list(&self) -> Vec<AvatarInfo> {
        let mut v: Vec<_> = self.map.lock().unwrap_or_else(|e| e.into_inner()).values().map(|a| a.info()).collect();
        v.sort_by(|a, b| a.avatar_id.cmp(&b.avatar_id));
        v
    }

    /// Removes the avatar and its files; refused while it is being prepared.
    pub fn remove(&self, id: &str) -> Result<(), AvatarError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let a = map.get(id).cloned().ok_or_else(|| AvatarError::NotFound(id.to_string()))?;
        if a.state() == AvatarState::Preparing {
            return Err(AvatarError::Preparing(id.to_string()));
        }
        map.remove(id);
        drop(map);
        if let Err(e) = std::fs::remove_dir_all(&a.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(avatar = id, "cannot remove avatar dir: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let s = AvatarStore::default();
        s.reserve("alice").unwrap();
        assert!(matches!(s.reserve("alice"), Err(AvatarError::Exists(_))), "a second upload for the same id is refused");
        let a = s.insert("alice", dir.path().join("alice"), dir.path().join("alice/source.mp4"), MediaInfo::default(), None, "job1".into());
        assert!(matches!(s.reserve("alice"), Err(AvatarError::Exists(_))));
        assert!(matches!(s.ready("alice"), Err(AvatarError::Preparing(_))));
        assert!(matches!(s.remove("alice"), Err(AvatarError::Preparing(_))));
        a.set_state(AvatarState::Failed, Some("no face".into()));
        assert!(matches!(s.ready("alice"), Err(AvatarError::Failed { .. })));
        a.set_state(AvatarState::Ready, None);
        assert!(s.ready("alice").is_ok());
        assert_eq!(s.list().len(), 1);
        s.remove("alice").unwrap();
        assert!(matches!(s.get("alice"), Err(AvatarError::NotFound(_))));
        s.reserve("bob").unwrap();
        s.unreserve("bob");
        s.reserve("bob").unwrap();
    }
}
