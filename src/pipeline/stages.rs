//! Turning a pipeline's output lines into stage events: MuseTalk's stdout markers and
//! tqdm bars, JSON-line stage events, ffmpeg `-progress` output.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use serde::Deserialize;

use super::Stream;

/// Something a pipeline told us about its progress.
#[derive(Clone, Debug, PartialEq)]
pub enum StageEvent {
    Start { name: String, at: Instant },
    End { name: String, at: Instant },
    Progress { done: u64, total: Option<u64> },
    /// The first output frame is ready (time to first frame).
    FirstFrame { at: Instant },
    /// One model batch took `seconds` (from the pipeline's own per-batch progress).
    Batch { seconds: f64 },
}

/// Reads a child's lines. One parser per job run.
pub trait StageParser: Send + Sync {
    /// Called when the process starts (a stage may begin with it).
    fn begin(&mut self, _at: Instant) -> Vec<StageEvent> {
        Vec::new()
    }
    fn line(&mut self, stream: Stream, line: &str, at: Instant) -> Vec<StageEvent>;
    /// Called when the process has ended: closes whatever stage is open.
    fn finish(&mut self, at: Instant) -> Vec<StageEvent>;
    /// The output path the pipeline announced, if it does.
    fn reported_output(&self) -> Option<PathBuf> {
        None
    }
    /// The failure the pipeline announced, if any (MuseTalk exits 0 on failure).
    fn reported_error(&self) -> Option<String> {
        None
    }
}

/// A pipeline whose stages follow each other, each started by a marker line:
/// the marker ends the current stage and begins the next.
pub struct SequentialStages {
    current: Option<String>,
}

impl SequentialStages {
    pub fn new() -> Self {
        SequentialStages { current: None }
    }

    /// Switches to `name` (no-op if it is already the current stage).
    pub fn enter(&mut self, name: &str, at: Instant) -> Vec<StageEvent> {
        if self.current.as_deref() == Some(name) {
            return Vec::new();
        }
        let mut ev = self.close(at);
        ev.push(StageEvent::Start { name: name.to_string(), at });
        self.current = Some(name.to_string());
        ev
    }

    pub fn close(&mut self, at: Instant) -> Vec<StageEvent> {
        self.current.take().map(|name| StageEvent::End { name, at }).into_iter().collect()
    }

    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }
}

impl Default for SequentialStages {
    fn default() -> Self {
        Self::new()
    }
}

/// `done/total` from a tqdm bar line (` 40%|████      | 4/10 [00:01<00:01,  3.2it/s]`).
pub fn tqdm_progress(line: &str) -> Option<(u64, u64)> {
    let bar_end = line.rfind('|')?;
    let rest = line[bar_end + 1..].trim_start();
    let counts = rest.split_whitespace().next()?;
    let (done, total) = counts.split_once('/')?;
    let done = done.parse().ok()?;
    let total = total.parse().ok()?;
    (done <= total).then_some((done, total))
}

/// JSON-line events a pipeline may print on stdout (the realtime worker protocol's shape):
/// `{"event":"stage_start","name":"x"}`, `{"event":"stage_end","name":"x"}`,
/// `{"event":"progress","done":3,"total":10}`, `{"event":"error","message":"…"}`,
/// `{"event":"result","output":"/path.mp4"}`.
#[derive(Debug, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JsonEvent {
    StageStart { name: String },
    StageEnd { name: String },
    Progress { done: u64, total: Option<u64> },
    Error { message: String },
    Result { output: Option<String> },
}

/// Parses JSON-line stage events; other lines are plain log lines.
#[derive(Default)]
pub struct JsonLineStages {
    open: Vec<String>,
    error: Option<String>,
    output: Option<PathBuf>,
}

impl JsonLineStages {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StageParser for JsonLineStages {
    fn line(&mut self, stream: Stream, line: &str, at: Instant) -> Vec<StageEvent> {
        if stream != Stream::Stdout || !line.trim_start().starts_with('{') {
            return Vec::new();
        }
        let Ok(ev) = serde_json::from_str::<JsonEvent>(line.trim()) else {
            return Vec::new();
        };
        match ev {
            JsonEvent::StageStart { name } => {
                let name = sanitize_stage(&name);
                if self.open.contains(&name) {
                    return Vec::new();
                }
                self.open.push(name.clone());
                vec![StageEvent::Start { name, at }]
            }
            JsonEvent::StageEnd { name } => {
                let name = sanitize_stage(&name);
                match self.open.iter().position(|n| *n == name) {
                    Some(i) => {
                        self.open.remove(i);
                        vec![StageEvent::End { name, at }]
                    }
                    None => Vec::new(),
                }
            }
            JsonEvent::Progress { done, total } => vec![StageEvent::Progress { done, total }],
            JsonEvent::Error { message } => {
                self.error = Some(message);
                Vec::new()
            }
            JsonEvent::Result { output } => {
                self.output = output.map(PathBuf::from);
                Vec::new()
            }
        }
    }

    fn finish(&mut self, at: Instant) -> Vec<StageEvent> {
        self.open.drain(..).map(|name| StageEvent::End { name, at }).collect()
    }

    fn reported_output(&self) -> Option<PathBuf> {
        self.output.clone()
    }

    fn reported_error(&self) -> Option<String> {
        self.error.clone()
    }
}

/// Stage names from pipelines become span names and a metric label: keep them to
/// `[a-z0-9_]`, at most 48 characters.
pub fn sanitize_stage(name: &str) -> String {
    let s: String = name
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .take(48)
        .collect();
    if s.is_empty() { "unnamed".into() } else { s }
}

/// Most distinct stage label values the process will ever publish; beyond it, `other`.
pub const MAX_STAGE_LABELS: usize = 64;
static STAGE_LABELS: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The bounded `stage` label for a stage name (names past [`MAX_STAGE_LABELS`] become `other`).
pub fn stage_label(name: &str) -> String {
    let mut guard = STAGE_LABELS.lock().unwrap_or_else(|e| e.into_inner());
    let set = guard.get_or_insert_with(HashSet::new);
    if set.contains(name) {
        return name.to_string();
    }
    if set.len() < MAX_STAGE_LABELS {
        set.insert(name.to_string());
        name.to_string()
    } else {
        "other".into()
    }
}

/// ffmpeg `-progress pipe:1` output: one `video_encoding` stage and frame progress.
pub struct FfmpegProgress {
    stages: SequentialStages,
    total_frames: Option<u64>,
    stage: &'static str,
    first_frame: bool,
}

impl FfmpegProgress {
    pub fn new(stage: &'static str, total_frames: Option<u64>) -> Self {
        FfmpegProgress { stages: SequentialStages::new(), total_frames, stage, first_frame: false }
    }
}

impl StageParser for FfmpegProgress {
    fn begin(&mut self, at: Instant) -> Vec<StageEvent> {
        self.stages.enter(self.stage, at)
    }

    fn line(&mut self, stream: Stream, line: &str, at: Instant) -> Vec<StageEvent> {
        if stream != Stream::Stdout {
            return Vec::new();
        }
        match line.split_once('=') {
            Some(("frame", n)) => {
                let Ok(done) = n.trim().parse::<u64>() else { return Vec::new() };
                let mut evs = Vec::new();
                // ffmpeg reports encoded frames: the first one is the first frame out.
                if done > 0 && !self.first_frame {
                    self.first_frame = true;
                    evs.push(StageEvent::FirstFrame { at });
                }
                evs.push(StageEvent::Progress { done, total: self.total_frames });
                evs
            }
            Some(("progress", "end")) => self.stages.close(at),
            _ => Vec::new(),
        }
    }

    fn finish(&mut self, at: Instant) -> Vec<StageEvent> {
        self.stages.close(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tqdm_bars_give_progress() {
        assert_eq!(tqdm_progress(" 40%|████      | 4/10 [00:01<00:01,  3.2it/s]"), Some((4, 10)));
        assert_eq!(tqdm_progress("100%|##########| 12/12 [00:03<00:00, 3.9it/s]"), Some((12, 12)));
        assert_eq!(tqdm_progress("Starting inference"), None);
        assert_eq!(tqdm_progress("|| 5/4"), None);
        assert_eq!(tqdm_progress("a | b"), None);
    }

    #[test]
    fn json_events_open_and_close_stages() {
        let t = Instant::now();
        let mut p = JsonLineStages::new();
        assert!(p.line(Stream::Stdout, "plain log line", t).is_empty());
        assert_eq!(p.line(Stream::Stdout, r#"{"event":"stage_start","name":"Face Detection"}"#, t), vec![StageEvent::Start { name: "face_detection".into(), at: t }]);
        assert!(p.line(Stream::Stderr, r#"{"event":"stage_start","name":"x"}"#, t).is_empty(), "stderr is logs only");
        assert_eq!(p.line(Stream::Stdout, r#"{"event":"progress","done":3,"total":9}"#, t), vec![StageEvent::Progress { done: 3, total: Some(9) }]);
        assert!(p.line(Stream::Stdout, r#"{"event":"stage_end","name":"never_started"}"#, t).is_empty());
        p.line(Stream::Stdout, r#"{"event":"stage_start","name":"unet"}"#, t);
        assert_eq!(p.line(Stream::Stdout, r#"{"event":"stage_end","name":"face_detection"}"#, t), vec![StageEvent::End { name: "face_detection".into(), at: t }]);
        p.line(Stream::Stdout, r#"{"event":"error","message":"CUDA out of memory"}"#, t);
        p.line(Stream::Stdout, r#"{"event": "stage_start", "name": 5}"#, t);
        assert_eq!(p.reported_error().as_deref(), Some("CUDA out of memory"));
        assert_eq!(p.finish(t), vec![StageEvent::End { name: "unet".into(), at: t }]);
    }

    #[test]
    fn stage_names_are_sanitized_and_labels_bounded() {
        assert_eq!(sanitize_stage("UNet + VAE"), "unet___vae");
        assert_eq!(sanitize_stage(""), "unnamed");
        assert_eq!(sanitize_stage(&"x".repeat(100)).len(), 48);
        for i in 0..(MAX_STAGE_LABELS + 10) {
            let _ = stage_label(&format!("stage_bound_test_{i}"));
        }
        assert_eq!(stage_label("stage_bound_test_never_seen"), "other");
    }

    #[test]
    fn ffmpeg_progress() {
        let t = Instant::now();
        let mut p = FfmpegProgress::new("video_encoding", Some(50));
        assert_eq!(p.begin(t), vec![StageEvent::Start { name: "video_encoding".into(), at: t }]);
        // No frame yet, then the first frames out: the first frame is said once.
        assert_eq!(p.line(Stream::Stdout, "frame=0", t), vec![StageEvent::Progress { done: 0, total: Some(50) }]);
        assert_eq!(p.line(Stream::Stdout, "frame=25", t), vec![StageEvent::FirstFrame { at: t }, StageEvent::Progress { done: 25, total: Some(50) }]);
        assert_eq!(p.line(Stream::Stdout, "frame=30", t), vec![StageEvent::Progress { done: 30, total: Some(50) }]);
        assert_eq!(p.line(Stream::Stdout, "progress=end", t), vec![StageEvent::End { name: "video_encoding".into(), at: t }]);
        assert!(p.finish(t).is_empty());
    }
}
