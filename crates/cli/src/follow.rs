//! Following a deployment: a live view of its stage DAG on a terminal
//! (status, elapsed time and the latest log line per stage), plain lines
//! otherwise. Everything is read from the state store, so it works the same
//! whether the deployment runs in this process or in an agent.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use cordon_store::{DeploymentRecord, DeploymentStatus, StageRecord, StageStatus, StateStore, now_ms};

use cordon_pipeline::agent;
use cordon_pipeline::plan::PlanSummary;

use crate::print::escape;

const TICK: Duration = Duration::from_millis(150);
/// How often a follower looks at the agents' heartbeats.
const LOOK: Duration = Duration::from_secs(1);

fn elapsed(stage: &StageRecord) -> String {
    match (stage.started_at, stage.finished_at) {
        (Some(s), Some(f)) if stage.status.is_final() => format!("{:.1}s", f.saturating_sub(s) as f64 / 1000.0),
        (Some(s), _) if stage.status == StageStatus::Running => format!("{:.1}s", now_ms().saturating_sub(s) as f64 / 1000.0),
        _ => String::new(),
    }
}

fn symbol(status: StageStatus) -> &'static str {
    match status {
        StageStatus::NotStarted => "·",
        StageStatus::Running => "▶",
        StageStatus::Paused => "‖",
        StageStatus::Success | StageStatus::Exited => "✔",
        StageStatus::Skipped => "↷",
        StageStatus::Failure => "✘",
        StageStatus::Cancelled => "■",
    }
}

/// The DAG edge of a stage, for display.
pub fn needs_text(stage: &StageRecord) -> String {
    if stage.needs.is_empty() { String::new() } else { format!("← {}", stage.needs.join(", ")) }
}

/// Follows deployment `id` until it ends; returns its final record.
pub async fn follow(store: &dyn StateStore, id: &str) -> Result<DeploymentRecord> {
    let tty = std::io::stdout().is_terminal();
    let multi = MultiProgress::with_draw_target(if tty { ProgressDrawTarget::stdout() } else { ProgressDrawTarget::hidden() });
    let style = ProgressStyle::with_template("{prefix} {msg}").expect("valid template");
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut printed: HashMap<String, StageStatus> = HashMap::new();
    let mut last_lines: HashMap<String, String> = HashMap::new();
    let mut after = 0i64;
    let mut last_status = None;
    // Why no agent ran it at the last look at the agents' heartbeats;
    // the first look waits until a runner started with us had time to beat.
    let mut next_look = std::time::Instant::now() + 2 * agent::HEARTBEAT;
    let mut stale: Option<agent::Stale> = None;
    let mut strategy_shown = false;
    // Above the live view on a terminal, a plain line otherwise.
    let say = |line: String| -> Result<()> {
        if tty {
            multi.println(line)?;
        } else {
            println!("{line}");
        }
        Ok(())
    };
    loop {
        let deployment = store.deployment(id)?.with_context(|| format!("no deployment `{id}`"))?;
        if last_status != Some(deployment.status) {
            if !deployment.status.is_final() {
                say(format!("deployment {id}: {}", deployment.status))?;
            }
            last_status = Some(deployment.status);
        }
        // The strategy, once planned: a quick sync says which configured
        // stages it leaves out.
        if !strategy_shown && let Ok(plan) = serde_json::from_str::<PlanSummary>(&deployment.plan) {
            say(format!("strategy: {} ({})", plan.strategy.as_str(), escape(&plan.summary)))?;
            strategy_shown = true;
        }
        if !deployment.status.is_final() && std::time::Instant::now() >= next_look {
            next_look = std::time::Instant::now() + LOOK;
            let now_stale = agent::nobody_runs(store, &deployment)?;
            // A silent agent stays one warning, however long it is silent.
            let changed = match (&now_stale, &stale) {
                (Some(agent::Stale::Silent { .. }), Some(agent::Stale::Silent { .. })) => false,
                (now, before) => now != before,
            };
            if changed {
                match &now_stale {
                    Some(why) => say(format!("warning: {why}"))?,
                    None => say("an agent that may run it is reporting".to_string())?,
                }
            }
            stale = now_stale;
        }
        let stages = store.stages(id)?;
        let logs = store.logs(id, None, after, 10_000)?;
        if let Some(last) = logs.last() {
            after = last.seq;
        }
        if tty {
            for log in logs {
                last_lines.insert(if log.stage.is_empty() { "plan".to_string() } else { log.stage }, escape(&log.text).into_owned());
            }
        } else {
            // Plain output: starts, log lines and ends in the order they
            // happened; within one millisecond, in plan order, and for one
            // stage its start, then its lines, then its end.
            let ordinal: HashMap<&str, u32> = stages.iter().map(|s| (s.id.as_str(), s.ordinal + 1)).collect();
            let mut events: Vec<(u64, u32, u8, String)> = Vec::new();
            for stage in &stages {
                let shown = printed.get(&stage.id).copied();
                if stage.status != StageStatus::NotStarted && shown.is_none() {
                    events.push((stage.started_at.unwrap_or(0), stage.ordinal + 1, 0, format!("stage {} running", stage.id)));
                }
                if stage.status.is_final() && !shown.is_some_and(StageStatus::is_final) {
                    let message = if stage.message.is_empty() { String::new() } else { format!(": {}", escape(&stage.message)) };
                    events.push((stage.finished_at.unwrap_or(0), stage.ordinal + 1, 2, format!("stage {} {} in {}{message}", stage.id, stage.status, elapsed(stage))));
                }
                if stage.status != StageStatus::NotStarted {
                    printed.insert(stage.id.clone(), stage.status);
                }
            }
            for log in logs {
                let order = ordinal.get(log.stage.as_str()).copied().unwrap_or(0);
                let label = if log.stage.is_empty() { "plan".to_string() } else { log.stage };
                events.push((log.at_ms, order, 1, format!("  {label} | {}: {}", log.source, escape(&log.text))));
            }
            events.sort_by_key(|(at, order, kind, _)| (*at, *order, *kind));
            for (_, _, _, line) in events {
                println!("{line}");
            }
        }
        let width = stages.iter().map(|s| s.id.len()).max().unwrap_or(0);
        for stage in stages.iter().filter(|_| tty) {
            let bar = bars.entry(stage.id.clone()).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar
            });
            bar.set_prefix(format!("{} {:<width$}", symbol(stage.status), stage.id));
            let detail = if stage.status.is_final() && !stage.message.is_empty() {
                escape(&stage.message).into_owned()
            } else {
                last_lines.get(&stage.id).cloned().unwrap_or_else(|| needs_text(stage))
            };
            bar.set_message(format!("{:<11} {:>7}  {}", stage.status.as_str(), elapsed(stage), truncate(&detail, 100)));
        }
        if deployment.status.is_final() {
            for bar in bars.values() {
                bar.finish();
            }
            let reason = if deployment.reason.is_empty() { String::new() } else { format!(": {}", escape(&deployment.reason)) };
            say(format!("deployment {id} {}{reason}", deployment.status))?;
            return Ok(deployment);
        }
        tokio::time::sleep(TICK).await;
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max { text.to_string() } else { format!("{}…", text.chars().take(max).collect::<String>()) }
}

/// The exit code for a finished deployment.
pub fn exit_code(status: DeploymentStatus) -> u8 {
    match status {
        DeploymentStatus::Success => 0,
        _ => 1,
    }
}
