//! The mode of a job — `simple` (one pipeline run per request) or `realtime` (a prepared avatar) — shared by every layer: jobs, metric labels, the collector's process trees, the status page.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Simple,
    Realtime,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Simple, Mode::Realtime];

    /// The bounded `mode` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Realtime => "realtime",
        }
    }

    /// Position in per-mode arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
