//! `command` backend: any pipeline given as an argv template, run without a shell.
//!
//! Placeholders `{video}`, `{audio}`, `{output}`, `{workdir}` are substituted per
//! argument. The pipeline may report its own stages as JSON lines on stdout
//! (`{"event":"stage_start","name":…}`, see [`super::stages::JsonEvent`]).

use std::path::PathBuf;

use futures::future::BoxFuture;

use super::stages::JsonLineStages;
use super::{Backend, Invocation, JobInput, PipelineError, ProcessOutcome, StageParser};
use crate::config::Config;

pub struct CommandBackend {
    argv: Vec<String>,
    env: Vec<(String, String)>,
}

impl CommandBackend {
    pub fn new(config: &Config) -> Self {
        CommandBackend { argv: config.pipeline_argv().unwrap_or_default(), env: config.pipeline_env_pairs() }
    }

    fn output(job: &JobInput) -> PathBuf {
        job.result_dir().join("output.mp4")
    }
}

/// Substitutes the placeholders in one argument.
pub fn substitute(arg: &str, job: &JobInput, output: &std::path::Path) -> String {
    arg.replace("{video}", &job.video.display().to_string())
        .replace("{audio}", &job.audio.display().to_string())
        .replace("{output}", &output.display().to_string())
        .replace("{workdir}", &job.dir.display().to_string())
}

impl Backend for CommandBackend {
    fn name(&self) -> &'static str {
        "command"
    }

    fn probe(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let program = self.argv.first().ok_or("--pipeline-command is empty")?;
            let found = if program.contains('/') {
                std::path::Path::new(program).is_file()
            } else {
                std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
            };
            if found { Ok(format!("runs {program}")) } else { Err(format!("`{program}` not found (absolute path, or on PATH)")) }
        })
    }

    fn prepare(&self, job: &JobInput) -> Result<Invocation, PipelineError> {
        std::fs::create_dir_all(job.result_dir()).map_err(|e| PipelineError::Config(format!("creating {}: {e}", job.result_dir().display())))?;
        let output = Self::output(job);
        let mut argv = self.argv.iter().map(|a| substitute(a, job, &output));
        let program = argv.next().ok_or_else(|| PipelineError::Config("--pipeline-command is empty".into()))?;
        Ok(Invocation { program, args: argv.collect(), cwd: job.dir.clone(), env: self.env.clone() })
    }

    fn stage_parser(&self, _: &JobInput) -> Box<dyn StageParser> {
        Box::new(JsonLineStages::new())
    }

    fn discover(&self, job: &JobInput, outcome: &ProcessOutcome, parser: &dyn StageParser) -> Result<PathBuf, PipelineError> {
        if let Some(e) = parser.reported_error() {
            return Err(PipelineError::Reported(e));
        }
        super::require_clean_exit(outcome)?;
        // A reported output must still be inside the job dir: a pipeline can't make us serve /etc/passwd.
        let path = match parser.reported_output() {
            Some(p) if p.starts_with(&job.dir) => p,
            Some(p) => return Err(PipelineError::Output(format!("reported output {} is outside the job directory", p.display()))),
            None => Self::output(job),
        };
        super::require_output(&path)
    }
}
