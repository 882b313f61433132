//! Invariants of a [`StageParser`]'s event stream.

use musetalk_sidecar::pipeline::StageEvent;

/// `[a-z0-9_]{1,48}`: what a stage name must look like (span name, metric label).
pub fn is_stage_name(s: &str) -> bool {
    (1..=48).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Follows one parser's events: every `End` closes an open `Start` of the same name,
/// no stage is opened twice at once, names are well-formed, and `finish` leaves nothing open.
pub struct StageTracker {
    who: &'static str,
    open: Vec<String>,
    pub starts: usize,
}

impl StageTracker {
    pub fn new(who: &'static str) -> Self {
        StageTracker {
            who,
            open: Vec::new(),
            starts: 0,
        }
    }

    /// Checks a batch of events (in order). `what` says which call produced them.
    pub fn feed(&mut self, events: &[StageEvent], what: &str) {
        for ev in events {
            match ev {
                StageEvent::Start { name, .. } => {
                    assert!(
                        is_stage_name(name),
                        "{}: {what}: stage name {name:?} is not [a-z0-9_]{{1,48}}",
                        self.who
                    );
                    assert!(
                        !self.open.contains(name),
                        "{}: {what}: stage {name:?} started while already open (open: {:?})",
                        self.who,
                        self.open
                    );
                    self.open.push(name.clone());
                    self.starts += 1;
                }
                StageEvent::End { name, .. } => {
                    assert!(
                        is_stage_name(name),
                        "{}: {what}: stage name {name:?} is not [a-z0-9_]{{1,48}}",
                        self.who
                    );
                    let Some(i) = self.open.iter().position(|n| n == name) else {
                        panic!(
                            "{}: {what}: End of {name:?} without an open Start (open: {:?})",
                            self.who, self.open
                        );
                    };
                    self.open.remove(i);
                }
                StageEvent::Progress { .. } | StageEvent::FirstFrame { .. } => {}
                StageEvent::Batch { seconds } => assert!(
                    seconds.is_finite() && *seconds >= 0.0,
                    "{}: {what}: batch of {seconds} s",
                    self.who
                ),
            }
        }
    }

    /// After the parser's `finish`: every stage must have been closed.
    pub fn done(&self) {
        assert!(
            self.open.is_empty(),
            "{}: stages left open after finish(): {:?}",
            self.who,
            self.open
        );
    }
}
