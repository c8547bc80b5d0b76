//! `cordon status`: recent deployments, or one with its stages.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use cordon_pipeline::agent::{self, Stale};
use cordon_pipeline::control;
use cordon_store::{DeploymentRecord, StateStore};

use crate::follow;
use crate::print::{ago, escape, json_line};

/// Recent deployments, or one deployment's stages.
#[derive(clap::Args)]
pub struct Status {
    deployment: Option<String>,
    /// JSON: one deployment per line, or one object with the stages.
    #[arg(long)]
    json: bool,
}

/// The agent that runs (or last ran) a deployment: `HOST/PID`; for an
/// unfinished one no agent holds, `(no agent)` or `(none eligible)` when
/// no live agent may run it, else `-`.
fn agent_of(store: &dyn StateStore, d: &DeploymentRecord) -> Result<String> {
    if let Some(owner) = store.lease(&d.id)?.and_then(|(_, owner)| owner) {
        return Ok(escape(&owner).into_owned());
    }
    if d.status.is_final() {
        return Ok("-".to_string());
    }
    Ok(match agent::nobody_runs(store, d)? {
        Some(Stale::Silent { .. }) => "(no agent)",
        Some(Stale::Ineligible { .. }) => "(none eligible)",
        None => "-",
    }
    .to_string())
}

impl Status {
    pub fn run(self, config_path: &Path) -> Result<ExitCode> {
        let store = super::state(config_path)?;
        let mut out = std::io::stdout().lock();
        match self.deployment.as_deref() {
            None => {
                if !self.json {
                    writeln!(out, "{:<24} {:<14} {:<12} {:>8}  {:<20} REASON", "DEPLOYMENT", "APPLICATION", "STATUS", "CREATED", "AGENT")?;
                }
                for d in store.deployments(None, 20)? {
                    let agent = agent_of(store.as_ref(), &d)?;
                    if self.json {
                        json_line(&mut out, &serde_json::json!({ "deployment": d, "agent": agent }))?;
                        continue;
                    }
                    writeln!(out, "{:<24} {:<14} {:<12} {:>8}  {:<20} {}", d.id, d.application, d.status.as_str(), ago(d.created_at), agent, escape(&d.reason))?;
                }
            }
            Some(id) => {
                let d = control::deployment(store.as_ref(), id)?;
                if self.json {
                    let agent = agent_of(store.as_ref(), &d)?;
                    json_line(&mut out, &serde_json::json!({ "deployment": d, "agent": agent, "stages": store.stages(id)? }))?;
                    return Ok(ExitCode::SUCCESS);
                }
                let reason = if d.reason.is_empty() { String::new() } else { format!(" ({})", escape(&d.reason)) };
                writeln!(out, "deployment {} of {}: {}{reason}; agent {}", d.id, d.application, d.status, agent_of(store.as_ref(), &d)?)?;
                for s in store.stages(id)? {
                    let took = match (s.started_at, s.finished_at) {
                        (Some(a), Some(b)) => format!("{:.1}s", b.saturating_sub(a) as f64 / 1000.0),
                        _ => String::new(),
                    };
                    writeln!(out, "  {:<24} {:<12} {:>7} {}  {}", s.id, s.status.as_str(), took, follow::needs_text(&s), escape(&s.message))?;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
