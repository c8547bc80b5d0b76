//! `cordon upload`: a local directory or tar archive into the source of a
//! paused deployment.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use cordon_pipeline::debug::upload;
use cordon_pipeline::{control, open_store};
use cordon_runtime::plugin::AgentConfig;
use cordon_runtime::sandbox::fs::TARGET;
use cordon_store::CommandKind;

use super::trigger::default_user;

/// Upload a local directory into the source of a paused deployment.
#[derive(clap::Args)]
pub struct Upload {
    deployment: String,
    /// The directory to upload (default: the current one).
    dir: Option<PathBuf>,
    /// Where inside the deployment's source to extract it.
    #[arg(long, default_value = ".")]
    to: PathBuf,
    /// More gitignore-style patterns to leave out (repeatable).
    #[arg(long = "ignore", value_name = "PATTERN")]
    ignore: Vec<String>,
    /// Upload this tar archive instead of a directory.
    #[arg(long, conflicts_with = "dir")]
    archive: Option<PathBuf>,
    /// Resume the deployment after the upload.
    #[arg(long = "continue")]
    resume: bool,
    #[arg(long = "as", default_value_t = default_user())]
    commander: String,
}

impl Upload {
    pub fn run(self, config_path: &Path) -> Result<ExitCode> {
        let store = open_store(&AgentConfig::load(config_path)?)?;
        let id = self.deployment.as_str();
        let stage = control::paused_stage(&store, id)?;
        let record = control::deployment(&store, id)?;
        let workspace = PathBuf::from(&record.target_snapshot);
        let limits = upload::Limits::default();
        let summary = match &self.archive {
            Some(file) => {
                let reader = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
                upload::extract(std::io::BufReader::new(reader), &workspace, &self.to, &limits)?
            }
            None => upload::upload_dir(self.dir.as_deref().unwrap_or(Path::new(".")), &self.ignore, &workspace, &self.to, &limits)?,
        };
        println!(
            "uploaded {} files ({} bytes) into {TARGET}/{} of deployment {id}, paused at {}",
            summary.files,
            summary.bytes,
            self.to.display(),
            stage.id
        );
        if self.resume {
            println!("{}", control::send(&store, id, None, CommandKind::DebugContinue, &self.commander)?);
        }
        Ok(ExitCode::SUCCESS)
    }
}
