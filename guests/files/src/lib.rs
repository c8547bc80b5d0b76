//! `files` — deploys a directory (a web server's document root, a config
//! directory): a planner and an executor in one component.
//!
//! Application settings (`plugins.files` in `app.cordon.yaml`):
//! `{"target": "/www", "canary": "/canary", "exclude": ["app.cordon.yaml"]}` —
//! `target` and `canary` are guest paths of read-write mounts the operator
//! granted; nothing else is needed.
//!
//! Each mount holds `releases/<id>/` trees and a `current` symlink that a
//! web server serves. A rollout copies the source into a new release and
//! flips `current` with an atomic rename, so readers see the old tree or the
//! new one, never a mix; files the source no longer has are simply not in
//! the new release. Older releases beyond the previous one are pruned. A
//! stage that runs again after a crash (the agent killed right after the
//! flip) finds its release already current and leaves it alone: the tree
//! readers are served is never modified.
//!
//! Stages: `FILES_SYNC` (quick sync: target := source), `FILES_CANARY_ROLLOUT`
//! (canary := source), `FILES_PRIMARY_ROLLOUT` (target := source),
//! `FILES_CANARY_CLEAN` (canary emptied), `FILES_ROLLBACK` (target := the
//! running source, canary emptied; added automatically). Versions: the
//! `VERSION` file, else a content hash. Strategy vote: pipeline sync when
//! `VERSION` changed, quick sync when only content changed.

use std::path::Path;

use cordon_sdk::log::info;
use cordon_sdk_deployment::{ArtifactVersion, Context, DeploymentPlugin, Outcome, PlanContext, PlannedStage, StageConfig, StagePlugin, SyncStrategy, planned};
use schemars::JsonSchema;
use serde::Deserialize;
use wasip2::filesystem::types::Descriptor;

/// `plugins.files` in the app config.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The directory served in production: the guest path of a read-write
    /// mount (its `guest:`, not its host path).
    #[schemars(extend("format" = "guest-mount-rw"))]
    target: String,
    /// The canary's directory, for the canary stages: another mount's guest path.
    #[serde(default)]
    #[schemars(extend("format" = "guest-mount-rw"))]
    canary: Option<String>,
    /// Top-level names of the source not copied.
    #[serde(default = "default_exclude")]
    exclude: Vec<String>,
}

fn default_exclude() -> Vec<String> {
    vec!["app.cordon.yaml".to_string()]
}

fn settings(settings: Result<Settings, String>) -> Result<Settings, String> {
    settings.map_err(|e| format!("{e}; expected `plugins.files` as {{\"target\": \"/www\", \"canary\": \"/canary\"}}"))
}

/// The preopened directory mounted at `guest_path`.
fn mount(guest_path: &str) -> Result<Descriptor, String> {
    wasip2::filesystem::preopens::get_directories()
        .into_iter()
        .find(|(_, name)| name == guest_path)
        .map(|(d, _)| d)
        .ok_or_else(|| format!("{guest_path} is not mounted: grant it to the plugin as a read-write mount"))
}

fn copy_tree(from: &Path, to: &Path, exclude: &[String], top: bool) -> Result<u64, String> {
    std::fs::create_dir_all(to).map_err(|e| format!("create {}: {e}", to.display()))?;
    let mut count = 0;
    let entries = std::fs::read_dir(from).map_err(|e| format!("read {}: {e}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if top && exclude.contains(&name) {
            continue;
        }
        let kind = entry.file_type().map_err(|e| e.to_string())?;
        let (src, dst) = (entry.path(), to.join(&name));
        if kind.is_dir() {
            count += copy_tree(&src, &dst, exclude, false)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst).map_err(|e| format!("copy {}: {e}", src.display()))?;
            count += 1;
        } else {
            info(format!("skipping {} (not a regular file)", src.display()));
        }
    }
    Ok(count)
}

fn current(mount_path: &str) -> Option<String> {
    mount(mount_path).ok()?.readlink_at("current").ok()
}

/// Points `current` at `target` atomically: a new symlink renamed over the old.
fn flip(mount_path: &str, target: &str) -> Result<(), String> {
    let dir = mount(mount_path)?;
    let _ = dir.unlink_file_at("current.next");
    dir.symlink_at(target, "current.next").map_err(|e| format!("symlink in {mount_path}: {e:?}"))?;
    dir.rename_at("current.next", &dir, "current").map_err(|e| format!("rename in {mount_path}: {e:?}"))
}

/// Removes releases other than those in `keep`.
fn prune(mount_path: &str, keep: &[Option<String>]) {
    let Ok(entries) = std::fs::read_dir(format!("{mount_path}/releases")) else { return };
    for entry in entries.flatten() {
        let rel = format!("releases/{}", entry.file_name().to_string_lossy());
        if !keep.iter().flatten().any(|k| *k == rel) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Copies `from` into a new release of `mount_path` and makes it current.
///
/// Safe to run again after a crash at any point: the release `current`
/// points to is never modified (if it is already this release, the earlier
/// run flipped it and nothing is left to do), and a release is built under a
/// `.partial` name and renamed into place only when complete.
fn release(mount_path: &str, from: &str, id: &str, exclude: &[String]) -> Result<String, String> {
    let previous = current(mount_path);
    let rel = format!("releases/{id}");
    if previous.as_deref() == Some(rel.as_str()) {
        return Ok(format!("{mount_path}/current already serves {rel} (an earlier run of this stage flipped it)"));
    }
    let dir = format!("{mount_path}/{rel}");
    let partial = format!("{mount_path}/releases/.{id}.partial");
    let _ = std::fs::remove_dir_all(&partial);
    let files = copy_tree(Path::new(from), Path::new(&partial), exclude, true)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&partial, &dir).map_err(|e| format!("rename {partial} to {dir}: {e}"))?;
    flip(mount_path, &rel)?;
    prune(mount_path, &[Some(rel.clone()), previous]);
    Ok(format!("{files} files from {from} now served from {mount_path}/current"))
}

/// Empties a mount: no `current`, no releases.
fn clear(mount_path: &str) -> Result<String, String> {
    let dir = mount(mount_path)?;
    match dir.unlink_file_at("current") {
        Ok(()) | Err(wasip2::filesystem::types::ErrorCode::NoEntry) => {}
        Err(e) => return Err(format!("unlink {mount_path}/current: {e:?}")),
    }
    prune(mount_path, &[]);
    Ok(format!("{mount_path} emptied"))
}

fn release_id(ctx: &Context) -> String {
    format!("{}-{}", ctx.deployment().id, ctx.stage().id).replace(['/', ':'], "_")
}

fn perform(ctx: &Context) -> Result<String, String> {
    let s = settings(ctx.settings())?;
    let canary = || s.canary.as_deref().ok_or("this stage needs `canary` in the `plugins.files` settings".to_string());
    let id = release_id(ctx);
    let source = ctx.source();
    match ctx.stage().name.as_str() {
        "FILES_SYNC" | "FILES_PRIMARY_ROLLOUT" => {
            let done = release(&s.target, source, &id, &s.exclude)?;
            if ctx.stage().name == "FILES_SYNC"
                && let Some(c) = &s.canary
            {
                clear(c)?;
            }
            Ok(done)
        }
        "FILES_CANARY_ROLLOUT" => release(canary()?, source, &id, &s.exclude),
        "FILES_CANARY_CLEAN" => clear(canary()?),
        "FILES_ROLLBACK" => {
            if let Some(c) = &s.canary {
                clear(c)?;
            }
            match ctx.running_source() {
                Some(running) => release(&s.target, running, &id, &s.exclude).map(|d| format!("rolled back: {d}")),
                None => clear(&s.target).map(|d| format!("rolled back to nothing (first deployment): {d}")),
            }
        }
        other => Err(format!("files does not perform stage {other}")),
    }
}

/// The stages take no options.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

struct Files;

impl StagePlugin for Files {
    const STAGES: &'static [(&'static str, &'static str)] = &[
        ("FILES_SYNC", "Make the target directory equal the source"),
        ("FILES_CANARY_ROLLOUT", "Roll the source out to the canary directory"),
        ("FILES_PRIMARY_ROLLOUT", "Roll the source out to the target directory"),
        ("FILES_CANARY_CLEAN", "Empty the canary directory"),
        ("FILES_ROLLBACK", "Restore the running source in the target directory"),
    ];
    type Options = NoOptions;

    fn run(ctx: &Context, _: NoOptions) -> Outcome {
        let done = perform(ctx);
        if let Ok(message) = &done {
            info(message);
        }
        done.into()
    }
}

fn version_of(dir: &str) -> Option<String> {
    std::fs::read_to_string(format!("{dir}/VERSION")).ok().map(|v| v.trim().to_string())
}

fn content_hash(dir: &Path, h: &mut u64) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).into_iter().flatten().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        for b in e.file_name().to_string_lossy().bytes() {
            *h = (*h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            content_hash(&e.path(), h);
        } else if let Ok(bytes) = std::fs::read(e.path()) {
            for b in bytes {
                *h = (*h ^ b as u64).wrapping_mul(0x100000001b3);
            }
        }
    }
}

impl DeploymentPlugin for Files {
    fn determine_strategy(ctx: &PlanContext) -> Result<Option<(SyncStrategy, String)>, String> {
        settings(ctx.settings())?;
        let Some(running) = ctx.running_source() else { return Ok(None) };
        Ok(match (version_of(ctx.source()), version_of(running)) {
            (Some(n), Some(o)) if n == o => Some((SyncStrategy::QuickSync, format!("VERSION is still {n}: only content changed"))),
            (Some(n), Some(o)) => Some((SyncStrategy::PipelineSync, format!("VERSION changed from {o} to {n}"))),
            _ => None,
        })
    }

    fn determine_versions(ctx: &PlanContext) -> Result<Vec<ArtifactVersion>, String> {
        let version = version_of(ctx.source()).unwrap_or_else(|| {
            let mut h = 0xcbf29ce484222325u64;
            content_hash(Path::new(ctx.source()), &mut h);
            format!("content-{h:016x}")
        });
        Ok(vec![ArtifactVersion { kind: "directory".into(), name: ctx.deployment().application_name.clone(), version, url: String::new() }])
    }

    fn quick_sync_stages(ctx: &PlanContext, rollback: bool) -> Result<Vec<PlannedStage>, String> {
        settings(ctx.settings())?;
        let mut out = vec![planned(0, "FILES_SYNC", false, "{}")];
        if rollback {
            out.push(planned(0, "FILES_ROLLBACK", true, "{}"));
        }
        Ok(out)
    }

    fn pipeline_sync_stages(ctx: &PlanContext, given: &[StageConfig], rollback: bool) -> Result<Vec<PlannedStage>, String> {
        let s = settings(ctx.settings())?;
        if s.canary.is_none() && given.iter().any(|g| g.name.starts_with("FILES_CANARY")) {
            return Err("canary stages need `canary` in the `plugins.files` settings".into());
        }
        let mut out: Vec<PlannedStage> = given.iter().map(|g| planned(g.index, &g.name, false, &g.options)).collect();
        if rollback && let Some(first) = given.first() {
            out.push(planned(first.index, "FILES_ROLLBACK", true, "{}"));
        }
        Ok(out)
    }
}

cordon_sdk_deployment::deployment_plugin!(Files, settings: Settings);
cordon_sdk::manifest! {
    name: "files",
    version: env!("CARGO_PKG_VERSION"),
    stages: <Files as StagePlugin>::STAGES,
    capabilities: r#"{}"#,
}
