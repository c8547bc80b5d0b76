//! The options of `deploy` and `plan` that describe a trigger.

use cordon_pipeline::debug::Breakpoints;
use cordon_pipeline::plan::{Strategy, TriggerInfo};
use cordon_store::StateStore;

#[derive(clap::Args, Clone)]
pub struct TriggerArgs {
    /// Force a strategy instead of letting the planners decide.
    #[arg(long, value_enum)]
    sync: Option<SyncArg>,
    /// Commit message (skip rules and commit matchers read it).
    #[arg(long, short = 'm', default_value = "")]
    message: String,
    /// Commit hash, for the record.
    #[arg(long, default_value = "")]
    commit: String,
    /// Who triggers the deployment (default: $USER); refused against a
    /// server, which records the token's subject.
    #[arg(long = "as")]
    commander: Option<String>,
    /// Pause before this stage runs (id or name; repeatable).
    #[arg(long = "break-before", value_name = "STAGE")]
    break_before: Vec<String>,
    /// Pause after this stage ran (id or name; repeatable).
    #[arg(long = "break-after", value_name = "STAGE")]
    break_after: Vec<String>,
    /// Pause at any stage that fails, instead of failing.
    #[arg(long = "break-on-failure")]
    break_on_failure: bool,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum SyncArg {
    Quick,
    Pipeline,
}

impl TriggerArgs {
    /// The trigger, recorded in `store`.
    pub fn info(&self, store: &dyn StateStore) -> anyhow::Result<TriggerInfo> {
        Ok(TriggerInfo {
            commit_hash: self.commit.clone(),
            commit_message: self.message.clone(),
            commander: commander(store, self.commander.clone())?,
            sync: self.sync.map(|s| match s {
                SyncArg::Quick => Strategy::QuickSync,
                SyncArg::Pipeline => Strategy::PipelineSync,
            }),
            breakpoints: Breakpoints {
                break_before: self.break_before.clone(),
                break_after: self.break_after.clone(),
                break_on_failure: self.break_on_failure,
            },
        })
    }
}

/// Who runs a command: `--as` (`given`), else `$USER`. Against a server
/// the token says who, so `--as` is refused there rather than ignored.
pub fn commander(store: &dyn StateStore, given: Option<String>) -> anyhow::Result<String> {
    match given {
        Some(_) if store.through_server() => {
            anyhow::bail!("--as is refused against a server: it records the subject of your token; drop --as")
        }
        Some(name) => Ok(name),
        None => Ok(user()),
    }
}

/// Who runs this command, as the machine says: `$USER`, else `operator`.
pub fn user() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".to_string())
}
