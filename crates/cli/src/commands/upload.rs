//! `cordon upload`: a local directory or tar archive into the source of a
//! paused deployment.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use cordon_pipeline::debug::upload::{self, Mode, Source};
use cordon_pipeline::{control, snapshot};
use cordon_runtime::plugin::AgentConfig;
use cordon_runtime::sandbox::fs::TARGET;
use cordon_store::CommandKind;

use super::trigger::commander;

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
    /// Make `--to` hold exactly the upload: remove the files it does not have.
    #[arg(long)]
    delete: bool,
    /// Resume the deployment after the upload.
    #[arg(long = "continue")]
    resume: bool,
    /// Who (default: $USER); refused against a server, which records your token's subject.
    #[arg(long = "as")]
    commander: Option<String>,
}

impl Upload {
    pub fn run(self, config_path: &Path) -> Result<ExitCode> {
        let store = super::state(config_path)?;
        // Where stored snapshots are fetched and local uploads are ordered:
        // the agent config's state directory, or (a person's machine, with
        // only a server) a directory of this command's own.
        let scratch;
        let snapshots = match AgentConfig::load(config_path) {
            Ok(config) => snapshot::dir(&config.state_dir),
            Err(_) if store.through_server() => {
                scratch = tempfile::tempdir().context("cannot make a scratch directory for the upload")?;
                scratch.path().to_path_buf()
            }
            Err(e) => return Err(e),
        };
        let id = self.deployment.as_str();
        let mode = if self.delete { Mode::Mirror } else { Mode::Merge };
        let waiting = || eprintln!("waiting for the running stages of {id} (or another upload) to finish…");
        let mut archive;
        let source = match &self.archive {
            Some(file) => {
                archive = std::io::BufReader::new(std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?);
                Source::Archive(&mut archive)
            }
            None => Source::Dir { dir: self.dir.as_deref().unwrap_or(Path::new(".")), ignore: &self.ignore },
        };
        let limits = upload::Limits::default();
        let request = upload::Request { source, to: &self.to, mode, limits: &limits };
        let (summary, stage) = upload::into_deployment(store.as_ref(), &snapshots, id, request, waiting)?;
        println!(
            "uploaded {} files ({} bytes) into {TARGET}/{} of deployment {id}, paused at {}",
            summary.files,
            summary.bytes,
            self.to.display(),
            stage.id
        );
        if self.resume {
            let who = commander(store.as_ref(), self.commander)?;
            println!("{}", control::send(store.as_ref(), id, None, CommandKind::DebugContinue, &who)?);
        }
        Ok(ExitCode::SUCCESS)
    }
}
