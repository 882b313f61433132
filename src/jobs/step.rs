//! The steps of a job: a closed set, named once, used by spans, metric labels, the report, events and the status page.

use serde::Serialize;

/// One step of a job's run, in the order they happen (`queue_wait` has its own span and
/// histogram; realtime jobs run `avatar_preparation` or `inference` where simple jobs run
/// `config_creation` and `subprocess_execution`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    FileProcessing,
    QueueWait,
    ConfigCreation,
    SubprocessExecution,
    AvatarPreparation,
    Inference,
    OutputDiscovery,
    ResponsePreparation,
}

impl Step {
    /// Every step, in run order (the status page's legend and colours follow it).
    pub const ALL: [Step; 8] = [
        Step::FileProcessing,
        Step::QueueWait,
        Step::ConfigCreation,
        Step::SubprocessExecution,
        Step::AvatarPreparation,
        Step::Inference,
        Step::OutputDiscovery,
        Step::ResponsePreparation,
    ];

    /// The bounded name: span name, `step` label, report and event field, CSS class.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::FileProcessing => "file_processing",
            Step::QueueWait => "queue_wait",
            Step::ConfigCreation => "config_creation",
            Step::SubprocessExecution => "subprocess_execution",
            Step::AvatarPreparation => "avatar_preparation",
            Step::Inference => "inference",
            Step::OutputDiscovery => "output_discovery",
            Step::ResponsePreparation => "response_preparation",
        }
    }

    /// The step that runs the pipeline: stage spans are its children, stage shares are of it.
    pub fn is_execution(self) -> bool {
        matches!(self, Step::SubprocessExecution | Step::AvatarPreparation | Step::Inference)
    }

    /// Only realtime jobs run it.
    pub fn is_realtime_only(self) -> bool {
        matches!(self, Step::AvatarPreparation | Step::Inference)
    }

    /// The step of a name (a report read back, a timing list).
    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_serialize_as_they_are_spelled() {
        for s in Step::ALL {
            assert_eq!(Step::from_name(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(Step::ALL.iter().filter(|s| s.is_execution()).count(), 3);
        assert_eq!(Step::from_name("nope"), None);
    }
}
