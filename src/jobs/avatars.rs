//! Avatars for realtime mode: a validated source video plus the engine's prepared material.
//!
//! Preparing an avatar costs minutes on a GPU, so avatars outlive the process: each
//! one's `avatar.json` manifest is rewritten on every state change, and a restarted
//! service serves the ready ones again (the engines read their material from disk).
//!
//! With `--shared-dir` several instances share the avatars' root
//! ([`AvatarStore::shared`]): the manifests on disk are the truth, each instance's map a
//! cache checked against them on every use, and `flock` locks in `.locks/` keep two
//! instances from preparing, deleting or cleaning up the same avatar at once — held
//! exclusively while one prepares or deletes it, shared while one speaks. A `flock` dies
//! with its process, so a crashed instance never leaves an avatar locked.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::pipeline::MediaInfo;

/// A cross-instance lock on one avatar (shared storage only).
type AvatarLock = Flock<File>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AvatarState {
    Preparing,
    Ready,
    Failed,
}

/// One avatar: `data/avatars/{id}/` holds `avatar.json`, and this preparation's
/// `source-{generation}.{ext}` and `material-{generation}/` (the generation is the
/// preparation job's id): a re-created avatar's files never carry an old one's names.
#[derive(Debug)]
pub struct Avatar {
    pub id: String,
    pub dir: PathBuf,
    pub video: PathBuf,
    /// The engine's prepared material for this generation.
    pub material: PathBuf,
    /// Speaks accepted for this avatar and not finished (their [`AvatarLease`]s).
    users: std::sync::atomic::AtomicUsize,
    pub video_info: MediaInfo,
    pub bbox_shift: Option<i32>,
    pub created: SystemTime,
    /// The job that prepares it (its progress and report).
    pub prepare_job: String,
    /// The realtime engine whose material this is (`preview`, `worker`).
    pub engine: String,
    /// Loaded from its manifest at start: the preparation job belonged to an earlier run.
    pub restored: bool,
    state: Mutex<(AvatarState, Option<String>)>,
    /// The exclusive lock held while this instance prepares it (shared storage only).
    hold: Mutex<Option<AvatarLock>>,
}

/// The file in an avatar's dir that lets a restarted service serve it again.
const MANIFEST: &str = "avatar.json";

/// `data/avatars/{id}/avatar.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    avatar_id: String,
    engine: String,
    /// The source video's file name, inside the avatar's dir.
    video: String,
    /// The material dir's name inside the avatar's dir (`material` before generations).
    #[serde(default = "legacy_material")]
    material: String,
    video_info: MediaInfo,
    bbox_shift: Option<i32>,
    created_unix_ms: u64,
    prepare_job_id: String,
    state: AvatarState,
    error: Option<String>,
}

fn legacy_material() -> String {
    "material".into()
}

/// The cross-instance locks' dir inside the avatars' root.
const LOCKS: &str = ".locks";

/// Why [`lock_file`] did not lock.
#[derive(Debug)]
pub enum LockFailure {
    /// The lock file cannot be made or opened.
    Io(std::io::Error),
    /// Another holder conflicts (or the filesystem refuses `flock`).
    Held(nix::errno::Errno),
}

/// Locks `name` in the avatars' `root` without waiting (`{root}/.locks/{name}`): the
/// lock every instance sharing `root` takes, and `check` tries.
pub fn lock_file(root: &Path, name: &str, exclusive: bool) -> Result<AvatarLock, LockFailure> {
    let dir = root.join(LOCKS);
    let file = std::fs::create_dir_all(&dir).and_then(|_| std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join(name))).map_err(LockFailure::Io)?;
    let how = if exclusive { FlockArg::LockExclusiveNonblock } else { FlockArg::LockSharedNonblock };
    Flock::lock(file, how).map_err(|(_, e)| LockFailure::Held(e))
}

fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    std::fs::read(dir.join(MANIFEST)).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice::<Manifest>(&b).map_err(|e| e.to_string()))
}

/// Where one preparation of an avatar lives (see [`Avatar`]).
pub struct AvatarPaths {
    pub dir: PathBuf,
    pub source: PathBuf,
    pub material: PathBuf,
}

/// `root/{id}/source-{generation}.{ext}` and `root/{id}/material-{generation}/`.
pub fn paths(root: &Path, id: &str, generation: &str, ext: &str) -> AvatarPaths {
    let dir = root.join(id);
    AvatarPaths { source: dir.join(format!("source-{generation}.{ext}")), material: dir.join(format!("material-{generation}")), dir }
}

/// What `GET /v1/avatars` lists.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AvatarInfo {
    pub avatar_id: String,
    pub state: AvatarState,
    pub error: Option<String>,
    pub prepare_job_id: String,
    /// True when the avatar was loaded from disk at start: its preparation job (and
    /// report) belonged to an earlier run and is gone; its trace, if exported, is not.
    pub restored: bool,
    pub created_at: String,
    /// The clip's length (measured where its header states none); `null` for a still image.
    pub video_seconds: Option<f64>,
    pub video_frames: Option<u64>,
    /// The displayed size (a phone clip's rotation applied).
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// The source video has an audio track (not used: speak brings the audio).
    pub has_audio: bool,
}

impl Avatar {
    /// This instance prepares it now (it holds the exclusive lock).
    fn preparing_here(&self) -> bool {
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    pub fn material_dir(&self) -> PathBuf {
        self.material.clone()
    }

    /// Speaks holding it now.
    pub fn users(&self) -> usize {
        self.users.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn state(&self) -> AvatarState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Sets the state and records it in the manifest (best effort: a manifest that
    /// cannot be written costs the avatar at the next restart, not now).
    pub fn set_state(&self, s: AvatarState, error: Option<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (s, error);
        if let Err(e) = self.persist() {
            tracing::warn!(avatar = %self.id, "cannot write the avatar manifest (the avatar will not survive a restart): {e}");
        }
        // Prepared (or failed): other instances may speak for it or delete it now.
        if s != AvatarState::Preparing {
            self.hold.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// Writes `avatar.json` whole or not at all (temporary file, then rename).
    fn persist(&self) -> std::io::Result<()> {
        let (state, error) = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let manifest = Manifest {
            avatar_id: self.id.clone(),
            engine: self.engine.clone(),
            video: self.video.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            material: self.material.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            video_info: self.video_info.clone(),
            bbox_shift: self.bbox_shift,
            created_unix_ms: self.created.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            prepare_job_id: self.prepare_job.clone(),
            state,
            error,
        };
        // Its own temporary name: on shared storage two instances may write at once.
        let tmp = self.dir.join(format!(".{MANIFEST}.{}.{}.tmp", std::process::id(), uuid::Uuid::new_v4().simple()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, self.dir.join(MANIFEST))
    }

    pub fn info(&self) -> AvatarInfo {
        let (state, error) = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        AvatarInfo {
            avatar_id: self.id.clone(),
            state,
            error,
            prepare_job_id: self.prepare_job.clone(),
            restored: self.restored,
            created_at: humantime::format_rfc3339_millis(self.created).to_string(),
            video_seconds: (!self.video_info.is_still()).then_some(self.video_info.duration_secs),
            video_frames: self.video_info.frames,
            width: self.video_info.width,
            height: self.video_info.height,
            has_audio: self.video_info.has_audio,
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
    #[error("avatar `{id}` is in use by {speaks} speak(s) queued or running; DELETE it once they have finished")]
    Busy { id: String, speaks: usize },
    /// Another instance sharing the avatars prepares, deletes or speaks for it now.
    #[error("avatar `{0}` is being prepared, deleted or spoken for by another instance; retry shortly")]
    BusyElsewhere(String),
}

/// A speak's hold on its avatar, from before its upload is read until the job ends:
/// while any exists the avatar cannot be deleted (so its files cannot vanish under a
/// running job, and a re-created avatar is never read by a job accepted for the old one).
#[derive(Debug)]
pub struct AvatarLease(Arc<Avatar>, #[allow(dead_code)] Option<AvatarLock>);

impl std::ops::Deref for AvatarLease {
    type Target = Arc<Avatar>;
    fn deref(&self) -> &Arc<Avatar> {
        &self.0
    }
}

impl Drop for AvatarLease {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// An avatar id held from the moment its `avatar_id` part is read until the avatar is
/// inserted ([`AvatarStore::insert`]) or the upload fails (dropped: released).
pub struct Reservation<'a> {
    store: &'a AvatarStore,
    id: String,
    /// Shared storage: the exclusive lock, handed to the avatar it becomes.
    lock: Option<AvatarLock>,
}

impl Reservation<'_> {
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.store.unreserve(&self.id);
    }
}

/// Avatars by id. An id is reserved as soon as its `avatar_id` part is read (before the
/// video when the client sends the id first), so two requests for one id cannot both win.
pub struct AvatarStore {
    /// The realtime engine of this run: material of another engine is not served.
    engine: String,
    map: Mutex<HashMap<String, Arc<Avatar>>>,
    reserved: Mutex<std::collections::HashSet<String>>,
    /// Shared storage: the avatars' root, which other instances write too.
    shared: Option<PathBuf>,
}

/// What one avatar dir holds, read from its manifest.
enum Found {
    Avatar(Arc<Avatar>),
    /// No readable manifest: why.
    Unreadable(String),
    /// A manifest naming another avatar: left alone.
    Foreign(String),
}

/// What [`AvatarStore::restore`] found under `data/avatars`.
#[derive(Debug, Default, PartialEq)]
pub struct Restored {
    /// Served again as `ready`.
    pub ready: usize,
    /// Listed as `failed` (their own failure, an interrupted preparation, a missing
    /// source video, another engine's material): the user decides, nothing is deleted.
    pub failed: usize,
    /// Dirs without a readable manifest (a crash between creating the dir and writing
    /// it): nothing can be served from them, so they are removed.
    pub removed: usize,
}

impl AvatarStore {
    pub fn new(engine: &str) -> AvatarStore {
        AvatarStore { engine: engine.to_string(), map: Mutex::default(), reserved: Mutex::default(), shared: None }
    }

    /// A store on storage other instances share (`--shared-dir`): see the module's text.
    pub fn shared(engine: &str, root: PathBuf) -> AvatarStore {
        AvatarStore { shared: Some(root), ..AvatarStore::new(engine) }
    }

    /// Takes the cross-instance lock of `id` without waiting: `Ok(None)` when the storage
    /// is not shared, `Err` when another holder conflicts.
    fn try_lock(&self, id: &str, exclusive: bool) -> Result<Option<AvatarLock>, AvatarError> {
        let Some(root) = &self.shared else { return Ok(None) };
        lock_file(root, id, exclusive).map(Some).map_err(|e| {
            if let LockFailure::Io(e) = e {
                tracing::warn!(avatar = id, "cannot open the avatar's lock file in {}: {e}", root.join(LOCKS).display());
            }
            AvatarError::BusyElsewhere(id.to_string())
        })
    }

    /// Reads one avatar dir's manifest into an avatar (not yet in the map). A
    /// `preparing` manifest whose lock nobody holds was cut short: recorded as failed.
    fn load(&self, dir: PathBuf, name: &str) -> Found {
        let read = || match read_manifest(&dir) {
            Ok(m) if m.avatar_id == name => Ok(m),
            Ok(m) => Err(Found::Foreign(m.avatar_id)),
            Err(why) => Err(Found::Unreadable(why)),
        };
        let mut m = match read() {
            Ok(m) => m,
            Err(found) => return found,
        };
        // Shared: a preparation runs while its instance holds the lock. Whether it was cut
        // short is decided under the lock, on the manifest as it is then (it may have
        // become ready between the two looks).
        let mut preparing_elsewhere = false;
        let mut _held = None;
        if m.state == AvatarState::Preparing && self.shared.is_some() {
            match self.try_lock(name, true) {
                Err(_) => preparing_elsewhere = true,
                Ok(lock) => {
                    _held = lock;
                    m = match read() {
                        Ok(m) => m,
                        Err(found) => return found,
                    };
                }
            }
        }
        let video = dir.join(&m.video);
        // One plain name inside the avatar's dir, never `..` or a path.
        let plain = |n: &str| matches!(Path::new(n).components().collect::<Vec<_>>().as_slice(), [std::path::Component::Normal(_)]);
        let material = dir.join(if plain(&m.material) { m.material.as_str() } else { "material" });
        let failure = if m.video.is_empty() || m.video.contains('/') || !video.is_file() {
            Some((format!("its source video `{}` is missing", m.video), false))
        } else {
            match m.state {
                AvatarState::Ready if m.engine == self.engine => None,
                // Kept as `ready` on disk: the same engine serves it again later.
                AvatarState::Ready => Some((format!("prepared by the `{}` realtime engine, and this service runs `{}`", m.engine, self.engine), false)),
                AvatarState::Preparing if preparing_elsewhere => None,
                AvatarState::Preparing => Some(("its preparation was interrupted (its instance stopped)".to_string(), true)),
                AvatarState::Failed => Some((m.error.clone().unwrap_or_else(|| "preparation failed".into()), false)),
            }
        };
        let state = if preparing_elsewhere { AvatarState::Preparing } else { AvatarState::Ready };
        let avatar = Arc::new(Avatar {
            id: m.avatar_id.clone(),
            dir,
            video,
            material,
            users: Default::default(),
            video_info: m.video_info,
            bbox_shift: m.bbox_shift,
            created: UNIX_EPOCH + Duration::from_millis(m.created_unix_ms),
            prepare_job: m.prepare_job_id,
            engine: m.engine,
            restored: true,
            state: Mutex::new((state, None)),
            hold: Mutex::new(None),
        });
        if let Some((why, record)) = failure {
            if record {
                // Under the lock taken above (shared storage): nobody prepares it meanwhile.
                avatar.set_state(AvatarState::Failed, Some(why));
            } else {
                *avatar.state.lock().unwrap_or_else(|e| e.into_inner()) = (AvatarState::Failed, Some(why));
            }
        }
        Found::Avatar(avatar)
    }

    /// Shared storage: brings the cached `id` in line with its manifest (another
    /// instance may have prepared, finished, deleted or re-created it).
    fn refresh(&self, id: &str) {
        let Some(root) = &self.shared else { return };
        let cached = self.map.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned();
        // This instance's own preparation writes the manifest: nothing to learn from it.
        if cached.as_ref().is_some_and(|a| a.preparing_here()) {
            return;
        }
        // The manifest says what the cache holds: nothing to rebuild. (A `preparing` one
        // is loaded again: whether it was cut short is decided by its lock.)
        if let Some(c) = &cached
            && let Ok(m) = read_manifest(&root.join(id))
            && m.state != AvatarState::Preparing
            && m.prepare_job_id == c.prepare_job
            && m.engine == c.engine
            && c.video.is_file()
            && (m.state == c.state() || (m.state == AvatarState::Ready && m.engine != self.engine))
        {
            return;
        }
        match self.load(root.join(id), id) {
            Found::Avatar(a) => {
                let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
                let current = map.get(id);
                // This instance began preparing it meanwhile ([`insert`](Self::insert)).
                let ours = current.is_some_and(|c| c.preparing_here());
                let same = current.is_some_and(|c| c.prepare_job == a.prepare_job && c.state() == a.state());
                if !ours && !same {
                    map.insert(id.to_string(), a);
                }
            }
            Found::Unreadable(_) | Found::Foreign(_) => {
                self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
            }
        }
    }

    /// Loads the avatars an earlier run (or, on shared storage, another instance) left
    /// under `root`.
    pub fn restore(&self, root: &Path) -> Restored {
        let mut found = Restored::default();
        let Ok(entries) = std::fs::read_dir(root) else { return found };
        for entry in entries.flatten() {
            let dir = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // `.locks`: the cross-instance locks (shared storage).
            if !dir.is_dir() || name.starts_with('.') {
                continue;
            }
            let avatar = match self.load(dir.clone(), &name) {
                Found::Avatar(a) => a,
                Found::Foreign(other) => {
                    tracing::warn!(dir = %dir.display(), "avatar manifest names `{other}`, not its dir: left alone");
                    continue;
                }
                Found::Unreadable(why) => {
                    // On shared storage another instance may be creating it now (its dir
                    // made, its manifest not yet written): only a dir nobody holds is debris.
                    let Ok(_lock) = self.try_lock(&name, true) else { continue };
                    let written_meanwhile = read_manifest(&dir).is_ok();
                    if written_meanwhile {
                        continue;
                    }
                    match std::fs::remove_dir_all(&dir) {
                        Ok(()) => found.removed += 1,
                        Err(e) => tracing::warn!(dir = %dir.display(), "cannot remove an avatar dir without a manifest: {e}"),
                    }
                    tracing::warn!(avatar = %name, "removed an avatar dir left without a readable manifest ({why})");
                    continue;
                }
            };
            if avatar.state() == AvatarState::Failed {
                found.failed += 1;
                tracing::warn!(avatar = %avatar.id, "restored avatar cannot speak: {}", avatar.info().error.unwrap_or_default());
            } else {
                found.ready += 1;
            }
            self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(avatar.id.clone(), avatar);
        }
        found
    }

    /// Reserves `id` while its video uploads (or while it is being deleted). `Err` if it
    /// exists or is reserved (on shared storage: by any instance).
    pub fn reserve(&self, id: &str) -> Result<Reservation<'_>, AvatarError> {
        self.refresh(id);
        let taken = || self.map.lock().unwrap_or_else(|e| e.into_inner()).contains_key(id) || self.reserved.lock().unwrap_or_else(|e| e.into_inner()).contains(id);
        if taken() {
            return Err(AvatarError::Exists(id.to_string()));
        }
        // The file work before the in-process locks: a slow shared mount stalls only this call.
        let lock = self.try_lock(id, true)?;
        // Another instance may have finished creating it between the look and the lock.
        if let Some(root) = &self.shared
            && root.join(id).join(MANIFEST).is_file()
        {
            return Err(AvatarError::Exists(id.to_string()));
        }
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(id) || !reserved.insert(id.to_string()) {
            return Err(AvatarError::Exists(id.to_string()));
        }
        Ok(Reservation { store: self, id: id.to_string(), lock })
    }

    fn unreserve(&self, id: &str) {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// Turns a reservation into an avatar in `preparing` (holding, on shared storage, the
    /// exclusive lock until it is ready or failed).
    pub fn insert(&self, mut reservation: Reservation<'_>, paths: AvatarPaths, video_info: MediaInfo, bbox_shift: Option<i32>, prepare_job: String) -> Arc<Avatar> {
        let id = reservation.id.clone();
        let a = Arc::new(Avatar {
            id: id.clone(),
            dir: paths.dir,
            video: paths.source,
            material: paths.material,
            users: Default::default(),
            video_info,
            bbox_shift,
            created: SystemTime::now(),
            prepare_job,
            engine: self.engine.clone(),
            restored: false,
            state: Mutex::new((AvatarState::Preparing, None)),
            hold: Mutex::new(reservation.lock.take()),
        });
        if let Err(e) = a.persist() {
            tracing::warn!(avatar = %id, "cannot write the avatar manifest (the avatar will not survive a restart): {e}");
        }
        // In the map before the reservation is released: the id is never free between.
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(id, a.clone());
        drop(reservation);
        a
    }

    pub fn get(&self, id: &str) -> Result<Arc<Avatar>, AvatarError> {
        self.refresh(id);
        self.map.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned().ok_or_else(|| AvatarError::NotFound(id.to_string()))
    }

    /// The avatar, leased, if it is ready to speak. The lease is taken under the map's
    /// lock, the one [`remove`](Self::remove) checks leases under: no delete slips between.
    /// On shared storage the lease also holds the avatar's lock shared: no instance
    /// deletes it meanwhile.
    pub fn ready(&self, id: &str) -> Result<AvatarLease, AvatarError> {
        self.refresh(id);
        let a = self.map.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned().ok_or_else(|| AvatarError::NotFound(id.to_string()))?;
        let (state, error) = a.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match state {
            AvatarState::Ready => {}
            AvatarState::Preparing => return Err(AvatarError::Preparing(id.to_string())),
            AvatarState::Failed => return Err(AvatarError::Failed { id: id.to_string(), why: error.unwrap_or_default() }),
        }
        let lock = self.try_lock(id, false)?;
        // Under the shared lock nobody deletes or re-creates it: check it is still this one.
        if let Some(root) = &self.shared {
            match read_manifest(&root.join(id)) {
                Ok(m) if m.prepare_job_id == a.prepare_job && m.state == AvatarState::Ready => {}
                Ok(_) => return Err(AvatarError::BusyElsewhere(id.to_string())),
                Err(_) => return Err(AvatarError::NotFound(id.to_string())),
            }
        }
        // Counted under the map's lock, which remove() checks the count under.
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if !map.get(id).is_some_and(|b| Arc::ptr_eq(b, &a)) {
            return Err(AvatarError::NotFound(id.to_string()));
        }
        a.users.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(AvatarLease(a, lock))
    }

    pub fn list(&self) -> Vec<AvatarInfo> {
        if let Some(root) = &self.shared {
            let on_disk = std::fs::read_dir(root).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.'));
            let cached: Vec<String> = self.map.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
            let ids: std::collections::BTreeSet<String> = on_disk.chain(cached).collect();
            for id in &ids {
                self.refresh(id);
            }
        }
        let mut v: Vec<_> = self.map.lock().unwrap_or_else(|e| e.into_inner()).values().map(|a| a.info()).collect();
        v.sort_by(|a, b| a.avatar_id.cmp(&b.avatar_id));
        v
    }

    /// Removes the avatar and its files; refused while it is being prepared or while
    /// speaks hold it (`Busy`: the client retries once they finish — refusing, rather
    /// than waiting, keeps DELETE's answer immediate and its outcome unambiguous). On
    /// shared storage, also while any instance prepares it or speaks for it.
    pub fn remove(&self, id: &str) -> Result<(), AvatarError> {
        self.refresh(id);
        let check = |map: &HashMap<String, Arc<Avatar>>| {
            let a = map.get(id).cloned().ok_or_else(|| AvatarError::NotFound(id.to_string()))?;
            if a.state() == AvatarState::Preparing {
                return Err(AvatarError::Preparing(id.to_string()));
            }
            match a.users() {
                0 => Ok(a),
                speaks => Err(AvatarError::Busy { id: id.to_string(), speaks }),
            }
        };
        check(&self.map.lock().unwrap_or_else(|e| e.into_inner()))?;
        // Shared: no instance speaks for it or prepares it while it is removed (a speak
        // here holds the lock shared too, so a lease taken since is refused here).
        let lock = self.try_lock(id, true)?;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let a = check(&map)?;
        map.remove(id);
        // Held while the files go: a new preparation of this id waits for the dir to be gone.
        self.reserved.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_string());
        drop(map);
        let _deleting = Reservation { store: self, id: id.to_string(), lock };
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

    /// Two instances on one shared root (two stores: each lock is its own open file, so
    /// they conflict as two processes' would).
    #[test]
    fn instances_sharing_avatars_never_prepare_delete_or_clean_up_the_same_one_at_once() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path().join("avatars");
        let (a, b) = (AvatarStore::shared("preview", root.clone()), AvatarStore::shared("preview", root.clone()));
        let video = |id: &str, job: &str| {
            let p = paths(&root, id, job, "mp4");
            std::fs::create_dir_all(&p.dir).unwrap();
            std::fs::write(&p.source, b"video").unwrap();
            p
        };
        let r = a.reserve("alice").unwrap();
        assert!(matches!(b.reserve("alice"), Err(AvatarError::BusyElsewhere(_))), "a reservation elsewhere holds the lock");
        let alice = a.insert(r, video("alice", "j1"), MediaInfo::default(), None, "j1".into());
        assert_eq!(b.get("alice").unwrap().state(), AvatarState::Preparing, "the other instance sees it preparing, not interrupted");
        assert!(matches!(b.ready("alice"), Err(AvatarError::Preparing(_))));
        assert!(matches!(b.reserve("alice"), Err(AvatarError::Exists(_))));
        alice.set_state(AvatarState::Ready, None);
        let lease = b.ready("alice").expect("the other instance speaks for it once ready");
        assert!(matches!(a.remove("alice"), Err(AvatarError::BusyElsewhere(_))), "no delete while another instance speaks");
        drop(lease);
        a.remove("alice").unwrap();
        assert!(matches!(b.get("alice"), Err(AvatarError::NotFound(_))), "deleted for every instance");
        assert!(b.list().is_empty());

        // An instance that dies while preparing: its lock goes with it; the others see a
        // preparation cut short.
        let c = AvatarStore::shared("preview", root.clone());
        let bob = c.insert(c.reserve("bob").unwrap(), video("bob", "j2"), MediaInfo::default(), None, "j2".into());
        drop(bob);
        drop(c);
        let seen = b.get("bob").unwrap().info();
        assert_eq!((seen.state, seen.error.as_deref()), (AvatarState::Failed, Some("its preparation was interrupted (its instance stopped)")));

        // Start-up clean-up leaves a dir another instance is creating (no manifest yet).
        let held = a.reserve("carol").unwrap();
        std::fs::create_dir_all(root.join("carol")).unwrap();
        let fresh = AvatarStore::shared("preview", root.clone());
        assert_eq!(fresh.restore(&root).removed, 0);
        assert!(root.join("carol").is_dir(), "another instance's files are left alone");
        drop(held);
        assert_eq!(AvatarStore::shared("preview", root.clone()).restore(&root).removed, 1, "debris once nobody holds it");
    }

    #[test]
    fn lifecycle_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let s = AvatarStore::new("preview");
        std::fs::create_dir_all(dir.path().join("alice")).unwrap();
        let r = s.reserve("alice").unwrap();
        assert!(matches!(s.reserve("alice"), Err(AvatarError::Exists(_))), "a second upload for the same id is refused");
        let a = s.insert(r, paths(dir.path(), "alice", "job1", "mp4"), MediaInfo::default(), None, "job1".into());
        assert!(matches!(s.reserve("alice"), Err(AvatarError::Exists(_))));
        assert!(matches!(s.ready("alice"), Err(AvatarError::Preparing(_))));
        assert!(matches!(s.remove("alice"), Err(AvatarError::Preparing(_))));
        a.set_state(AvatarState::Failed, Some("no face".into()));
        assert!(matches!(s.ready("alice"), Err(AvatarError::Failed { .. })));
        a.set_state(AvatarState::Ready, None);
        // Leased by two speaks: DELETE is refused until both are done.
        let (l1, l2) = (s.ready("alice").unwrap(), s.ready("alice").unwrap());
        assert!(matches!(s.remove("alice"), Err(AvatarError::Busy { speaks: 2, .. })));
        drop(l1);
        assert!(matches!(s.remove("alice"), Err(AvatarError::Busy { speaks: 1, .. })));
        drop(l2);
        assert_eq!(s.list().len(), 1);
        s.remove("alice").unwrap();
        assert!(matches!(s.get("alice"), Err(AvatarError::NotFound(_))));
        assert!(s.reserve("alice").is_ok(), "free again once its files are gone");
        let r = s.reserve("bob").unwrap();
        drop(r);
        s.reserve("bob").unwrap();
        // A re-created avatar's files have names of their own.
        let (old, new) = (paths(dir.path(), "x", "job1", "mp4"), paths(dir.path(), "x", "job2", "mp4"));
        assert_eq!(old.dir, new.dir);
        assert!(old.source != new.source && old.material != new.material);
    }

    /// An avatar prepared by `engine` in a fresh store over `root`, left in `state`.
    fn prepared(root: &Path, id: &str, engine: &str, state: AvatarState, error: Option<&str>) {
        let s = AvatarStore::new(engine);
        let p = paths(root, id, &format!("job-{id}"), "mp4");
        std::fs::create_dir_all(&p.dir).unwrap();
        std::fs::write(&p.source, b"video").unwrap();
        let info = MediaInfo { duration_secs: 2.0, has_video: true, width: Some(128), ..MediaInfo::default() };
        let a = s.insert(s.reserve(id).unwrap(), p, info, Some(-3), format!("job-{id}"));
        if state != AvatarState::Preparing {
            a.set_state(state, error.map(str::to_string));
        }
    }

    #[test]
    fn restore_serves_ready_avatars_again_and_explains_the_others() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        prepared(root, "ready", "worker", AvatarState::Ready, None);
        prepared(root, "other", "preview", AvatarState::Ready, None);
        prepared(root, "cut", "worker", AvatarState::Preparing, None);
        prepared(root, "failed", "worker", AvatarState::Failed, Some("face_detection: no face"));
        prepared(root, "novideo", "worker", AvatarState::Ready, None);
        std::fs::remove_file(root.join("novideo/source-job-novideo.mp4")).unwrap();
        std::fs::create_dir_all(root.join("nomanifest/material")).unwrap();
        std::fs::create_dir_all(root.join("garbled")).unwrap();
        std::fs::write(root.join("garbled").join(MANIFEST), b"{not json").unwrap();

        let s = AvatarStore::new("worker");
        assert_eq!(s.restore(root), Restored { ready: 1, failed: 4, removed: 2 });
        assert!(!root.join("nomanifest").exists() && !root.join("garbled").exists(), "dirs without a manifest are removed");

        let a = s.ready("ready").expect("a ready avatar of this engine speaks again");
        let info = a.info();
        assert!(info.restored);
        assert_eq!((info.prepare_job_id.as_str(), a.bbox_shift, info.video_seconds, info.width), ("job-ready", Some(-3), Some(2.0), Some(128)));
        assert_eq!(a.video, root.join("ready/source-job-ready.mp4"));
        assert_eq!(a.material_dir(), root.join("ready/material-job-ready"));

        let why = |id: &str| match s.ready(id) {
            Err(AvatarError::Failed { why, .. }) => why,
            other => panic!("{id}: {other:?}"),
        };
        assert!(why("other").contains("`preview` realtime engine"), "{}", why("other"));
        assert!(why("cut").contains("interrupted"));
        assert_eq!(why("failed"), "face_detection: no face");
        assert!(why("novideo").contains("missing"));

        // On disk: the interruption is recorded; another engine's avatar stays ready for it.
        let state_on_disk = |id: &str| serde_json::from_slice::<Manifest>(&std::fs::read(root.join(id).join(MANIFEST)).unwrap()).unwrap().state;
        assert_eq!(state_on_disk("cut"), AvatarState::Failed);
        assert_eq!(state_on_disk("other"), AvatarState::Ready);
        let back = AvatarStore::new("preview");
        back.restore(root);
        assert!(back.ready("other").is_ok(), "the preview engine serves its avatar again");

        // A restored avatar is removed like any other, files and all, once not leased.
        assert!(matches!(s.remove("ready"), Err(AvatarError::Busy { speaks: 1, .. })));
        drop(a);
        s.remove("ready").unwrap();
        assert!(!root.join("ready").exists());
    }
}
