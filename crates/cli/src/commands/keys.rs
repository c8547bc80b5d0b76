//! `cordon keys filter` and `cordon items apply`: streaming data through
//! key-filter and item-action plugins.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Result, bail};
use clap::Subcommand;

use cordon_contract::World;
use cordon_migrate::{items, keys};
use cordon_runtime::engine::Engine;
use cordon_runtime::plugin::{AgentConfig, Plugin};
use cordon_runtime::runner::{ItemActionSession, KeyFilterSession};
use cordon_runtime::sandbox::LogSink;

use crate::print::{Output, PrintSink, check_json, escape, open_input, progress_bar};

/// A plugin, its options, and where data comes from and goes.
#[derive(clap::Args)]
pub struct PluginIo {
    /// Plugin name from the agent config.
    #[arg(long)]
    plugin: String,
    /// The plugin's options as JSON.
    #[arg(long = "with", default_value = "{}")]
    with: String,
    /// Input file; `-` or nothing reads standard input.
    input: Option<PathBuf>,
    /// Output file (written atomically); standard output when absent.
    #[arg(long)]
    output: Option<PathBuf>,
}

impl PluginIo {
    /// Checks the options and loads the plugin, which must be of `world`.
    async fn load(&self, config_path: &Path, world: World) -> Result<(Engine, Plugin)> {
        check_json("--with", &self.with)?;
        let config = AgentConfig::load(config_path)?;
        let plugin_config = config.plugin(&self.plugin)?;
        cordon_registry::fetch_plugin(&config, plugin_config).await?;
        if plugin_config.world != world {
            bail!(
                "plugin `{}` is declared with world `{}` in {}; this command needs a `{world}` plugin",
                self.plugin,
                plugin_config.world,
                config_path.display()
            );
        }
        let engine = config.engine()?;
        let plugin = Plugin::load(&engine, plugin_config).await?;
        Ok((engine, plugin))
    }
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Write the selected keys (one per line, or JSON lines with a `key`) in input order.
    ///
    /// Exits 1 when some keys could not be classified (they are reported,
    /// and written to --unclassified when given), 0 otherwise.
    Filter {
        #[command(flatten)]
        io: PluginIo,
        /// Where to write the keys the filter could not classify.
        #[arg(long)]
        unclassified: Option<PathBuf>,
        /// Filter instances working in parallel (default: one per core).
        #[arg(long)]
        jobs: Option<usize>,
        /// Print the delete prefixes covering the selected keys instead of the keys.
        #[arg(long)]
        prefixes: bool,
    },
}

impl KeysCommand {
    pub async fn run(self, config_path: &Path) -> Result<ExitCode> {
        let KeysCommand::Filter { io, unclassified, jobs, prefixes } = self;
        let (engine, plugin) = io.load(config_path, World::KeyFilter).await?;
        let reader = open_input(io.input.as_deref())?;
        let sink: Arc<dyn LogSink> = Arc::new(PrintSink::Stderr);
        let open = || KeyFilterSession::open(&engine, &plugin, &io.with, sink.clone());
        if prefixes {
            let mut session = open().await?;
            let found = keys::filter::delete_prefixes(reader, &mut session).await?;
            let mut out = Output::open(io.output.as_deref())?;
            for p in found {
                writeln!(out.writer(), "{p}")?;
            }
            out.commit()?;
            return Ok(ExitCode::SUCCESS);
        }
        let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
        let mut sessions = Vec::with_capacity(jobs);
        for _ in 0..jobs {
            sessions.push(open().await?);
        }
        let mut out = Output::open(io.output.as_deref())?;
        let mut rejects = unclassified.as_deref().map(|p| Output::open(Some(p))).transpose()?;
        let bar = progress_bar("keys");
        let progress = |n: u64| bar.set_position(n);
        let sinks = keys::filter::Sinks { selected: out.writer(), unclassified: rejects.as_mut().map(Output::writer), progress: &progress };
        let stats = keys::filter::run(reader, sessions, sinks).await?;
        bar.finish_and_clear();
        out.commit()?;
        if let Some(r) = rejects {
            r.commit()?;
        }
        eprintln!("{} keys: {} selected, {} unclassified", stats.keys, stats.selected, stats.unclassified);
        if stats.unclassified > 0 {
            for key in &stats.unclassified_sample {
                eprintln!("  unclassified: {}", escape(key));
            }
            if unclassified.is_none() {
                eprintln!("  (pass --unclassified FILE to keep all of them)");
            }
            return Ok(ExitCode::from(1));
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(Subcommand)]
pub enum ItemsCommand {
    /// Apply the action to JSON items, one per line, in input order.
    Apply {
        #[command(flatten)]
        io: PluginIo,
    },
}

impl ItemsCommand {
    pub async fn run(self, config_path: &Path) -> Result<ExitCode> {
        let ItemsCommand::Apply { io } = self;
        let (engine, plugin) = io.load(config_path, World::ItemAction).await?;
        let reader = open_input(io.input.as_deref())?;
        let mut session = ItemActionSession::open(&engine, &plugin, Arc::new(PrintSink::Stderr)).await?;
        let mut out = Output::open(io.output.as_deref())?;
        let stats = items::run(reader, out.writer(), &mut session, &io.with).await?;
        out.commit()?;
        eprintln!(
            "{} items: {} modified, {} unchanged, {} skipped, {} additional, {} duplicates dropped",
            stats.items, stats.modified, stats.unchanged, stats.skipped, stats.additional, stats.duplicates
        );
        Ok(ExitCode::SUCCESS)
    }
}
