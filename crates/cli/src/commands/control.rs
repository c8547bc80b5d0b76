//! `cordon approve|skip|cancel`: commands to a running deployment, checked
//! and recorded by [`cordon_pipeline::control`].

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;

use cordon_pipeline::control;
use cordon_store::{Answer, CommandKind};

use crate::print::escape;

use super::trigger::commander;

/// Approve a stage that waits for approval, and wait for its answer.
///
/// Exits 0 when the stage accepted the approval, 1 when it refused it (an
/// approver not on the list), and 0 with a warning when no answer came
/// within `--wait` (no agent running, or a plugin that does not answer).
#[derive(clap::Args)]
pub struct Approve {
    deployment: String,
    stage: String,
    /// Who (default: $USER); refused against a server, which records your token's subject.
    #[arg(long = "as")]
    commander: Option<String>,
    /// How long to wait for the stage's answer.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

/// Skip a stage (interrupting it if it runs).
#[derive(clap::Args)]
pub struct Skip {
    deployment: String,
    stage: String,
    /// Who (default: $USER); refused against a server, which records your token's subject.
    #[arg(long = "as")]
    commander: Option<String>,
}

/// Cancel a deployment; rollback runs if the application enables it.
#[derive(clap::Args)]
pub struct Cancel {
    deployment: String,
    /// Who (default: $USER); refused against a server, which records your token's subject.
    #[arg(long = "as")]
    commander: Option<String>,
}

impl Approve {
    pub fn run(self, config: &Path) -> Result<ExitCode> {
        let store = super::state(config)?;
        let who = commander(store.as_ref(), self.commander)?;
        let sent = control::send(store.as_ref(), &self.deployment, Some(&self.stage), CommandKind::Approve, &who)?;
        match control::await_answer(store.as_ref(), &sent, self.wait)? {
            Some(Answer::Accepted) => {
                println!("{sent}: accepted");
                Ok(ExitCode::SUCCESS)
            }
            Some(Answer::Refused(reason)) => {
                eprintln!("error: {} refused the approval by {}: {}", sent.target(), sent.commander, escape(&reason));
                Ok(ExitCode::FAILURE)
            }
            None => {
                println!("{sent}");
                eprintln!(
                    "warning: no answer from the stage within {}; see `cordon logs {} --stage {}` (is an agent running?)",
                    humantime::format_duration(self.wait),
                    sent.deployment,
                    sent.stage
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

impl Skip {
    pub fn run(self, config: &Path) -> Result<ExitCode> {
        send(config, &self.deployment, Some(&self.stage), CommandKind::Skip, self.commander)
    }
}

impl Cancel {
    pub fn run(self, config: &Path) -> Result<ExitCode> {
        send(config, &self.deployment, None, CommandKind::Cancel, self.commander)
    }
}

fn send(config: &Path, id: &str, stage: Option<&str>, kind: CommandKind, given: Option<String>) -> Result<ExitCode> {
    let store = super::state(config)?;
    let who = commander(store.as_ref(), given)?;
    println!("{}", control::send(store.as_ref(), id, stage, kind, &who)?);
    Ok(ExitCode::SUCCESS)
}
