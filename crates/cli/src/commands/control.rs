//! `cordon approve|skip|cancel`: commands to a running deployment, checked
//! and recorded by [`cordon_pipeline::control`].

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use cordon_pipeline::{control, open_store};
use cordon_runtime::plugin::AgentConfig;
use cordon_store::CommandKind;

use super::trigger::default_user;

/// Approve a stage that waits for approval.
#[derive(clap::Args)]
pub struct Approve {
    deployment: String,
    stage: String,
    /// Who approves.
    #[arg(long = "as", default_value_t = default_user())]
    commander: String,
}

/// Skip a stage (interrupting it if it runs).
#[derive(clap::Args)]
pub struct Skip {
    deployment: String,
    stage: String,
    #[arg(long = "as", default_value_t = default_user())]
    commander: String,
}

/// Cancel a deployment; rollback runs if the application enables it.
#[derive(clap::Args)]
pub struct Cancel {
    deployment: String,
    #[arg(long = "as", default_value_t = default_user())]
    commander: String,
}

impl Approve {
    pub fn run(self, config: &Path) -> Result<ExitCode> {
        send(config, &self.deployment, Some(&self.stage), CommandKind::Approve, &self.commander)
    }
}

impl Skip {
    pub fn run(self, config: &Path) -> Result<ExitCode> {
        send(config, &self.deployment, Some(&self.stage), CommandKind::Skip, &self.commander)
    }
}

impl Cancel {
    pub fn run(self, config: &Path) -> Result<ExitCode> {
        send(config, &self.deployment, None, CommandKind::Cancel, &self.commander)
    }
}

fn send(config: &Path, id: &str, stage: Option<&str>, kind: CommandKind, commander: &str) -> Result<ExitCode> {
    let store = open_store(&AgentConfig::load(config)?)?;
    println!("{}", control::send(&store, id, stage, kind, commander)?);
    Ok(ExitCode::SUCCESS)
}
