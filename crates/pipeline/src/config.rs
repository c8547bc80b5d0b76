//! The application config, `app.cordon.yaml` in the application directory.
//!
//! ```yaml
//! name: site
//! labels: { team: web }
//! agents: { env: prod }             # only agents with these labels run it
//! timeout: 30m                      # the whole deployment (default 6h)
//! planner:
//!   alwaysUsePipeline: false
//!   autoRollback: true              # default
//!   commitMatcher:                  # regexes on the commit message
//!     quickSync: '^\[quick\]'
//!     pipeline: '^\[pipeline\]'
//! pipeline:
//!   stages:
//!     - name: FILES_CANARY_ROLLOUT
//!       with: { replicas: 1 }
//!     - id: check                   # optional; `needs` refers to ids (or names)
//!       name: HTTP_CHECK
//!       timeout: 2m                 # default 6h, capped by the plugin's limit
//!       with: { url: "http://127.0.0.1:8080/" }
//!       skipOn:
//!         commitMessagePrefixes: ["[skip check]"]
//!         paths: ["docs/**"]        # skipped when every changed file matches
//!     - name: FILES_PRIMARY_ROLLOUT
//!       needs: [check]              # default: the previous stage
//! plugins:                          # settings per plugin, passed as JSON
//!   files: { target: /srv/www }
//! ```
//!
//! The field names follow PipeCD's (camelCase). Unknown fields, a stage no
//! plugin defines, a `needs` cycle or a reference to no stage are each one
//! error naming the file, before anything runs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use globset::{Glob, GlobSet, GlobSetBuilder};
use regex::Regex;
use serde::Deserialize;

/// The file name of an application config inside its directory.
pub const FILE_NAME: &str = "app.cordon.yaml";
/// Timeout of a stage that sets none (PipeCD's default).
pub const DEFAULT_STAGE_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Timeout of a deployment that sets none.
pub const DEFAULT_DEPLOYMENT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AppConfig {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Labels an agent must have to run this application's deployments.
    #[serde(default)]
    pub agents: BTreeMap<String, String>,
    #[serde(default)]
    pub pipeline: Option<Pipeline>,
    #[serde(default)]
    pub planner: PlannerOptions,
    /// Timeout of the whole deployment.
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Settings per plugin, handed to it as JSON `app-config`.
    #[serde(default)]
    pub plugins: BTreeMap<String, serde_json::Value>,
    /// Breakpoints (`breakBefore`, `breakAfter`, `breakOnFailure`).
    #[serde(default)]
    pub debug: Option<crate::debug::Breakpoints>,
    /// Directory the config was read from.
    #[serde(skip)]
    pub dir: PathBuf,
    /// The config file.
    #[serde(skip)]
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pipeline {
    pub stages: Vec<StageConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StageConfig {
    /// How `needs` refers to this stage; defaults to its name.
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(default)]
    pub desc: String,
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// Options for the plugin, passed as JSON.
    #[serde(default = "empty_object")]
    pub with: serde_json::Value,
    /// Stages this one waits for; default: the previous stage. `[]` starts
    /// it at once.
    #[serde(default)]
    pub needs: Option<Vec<String>>,
    #[serde(default)]
    pub skip_on: SkipOn,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl StageConfig {
    /// The name `needs` uses for this stage.
    pub fn key(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SkipOn {
    /// Skip when the commit message starts with one of these.
    #[serde(default)]
    pub commit_message_prefixes: Vec<String>,
    /// Skip when every changed file matches one of these globs.
    #[serde(default)]
    pub paths: Vec<String>,
}

impl SkipOn {
    /// Why the stage is skipped, if it is.
    pub fn reason(&self, commit_message: &str, changed: &[String]) -> Option<String> {
        if let Some(prefix) = self.commit_message_prefixes.iter().find(|p| commit_message.starts_with(p.as_str())) {
            return Some(format!("skipped: the commit message starts with {prefix:?}"));
        }
        if !self.paths.is_empty() && !changed.is_empty() {
            let set = globs(&self.paths).ok()?;
            if changed.iter().all(|f| set.is_match(f)) {
                return Some(format!("skipped: every changed file matches skipOn.paths {:?}", self.paths));
            }
        }
        None
    }
}

fn globs(patterns: &[String]) -> Result<GlobSet> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        builder.add(Glob::new(p).with_context(|| format!("invalid path pattern {p:?}"))?);
    }
    Ok(builder.build()?)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PlannerOptions {
    #[serde(default)]
    pub always_use_pipeline: bool,
    #[serde(default = "yes")]
    pub auto_rollback: bool,
    #[serde(default)]
    pub commit_matcher: CommitMatcher,
}

impl Default for PlannerOptions {
    fn default() -> Self {
        Self { always_use_pipeline: false, auto_rollback: true, commit_matcher: CommitMatcher::default() }
    }
}

fn yes() -> bool {
    true
}

/// Regexes on the commit message that choose the strategy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CommitMatcher {
    #[serde(default)]
    pub quick_sync: Option<String>,
    #[serde(default)]
    pub pipeline: Option<String>,
}

impl AppConfig {
    /// Reads `app.cordon.yaml` from `dir` and checks what needs no plugins.
    pub fn load(dir: &Path) -> Result<Self> {
        let file = dir.join(FILE_NAME);
        let text = std::fs::read_to_string(&file).with_context(|| {
            format!("cannot read {}; an application directory needs an {FILE_NAME}", file.display())
        })?;
        Self::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let shown = file.display();
        let mut config: AppConfig =
            serde_yaml_ng::from_str(text).with_context(|| format!("{shown}: not a valid application config"))?;
        config.file = file.to_path_buf();
        config.dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        config.validate().map_err(|e| anyhow::anyhow!("{shown}: {e:#}"))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if !cordon_store::is_safe_name(&self.name) {
            bail!("application name {:?} must be 1 to 128 letters, digits, '-', '_' or '.', not starting with '.'", self.name);
        }
        for (field, pattern) in [
            ("planner.commitMatcher.quickSync", &self.planner.commit_matcher.quick_sync),
            ("planner.commitMatcher.pipeline", &self.planner.commit_matcher.pipeline),
        ] {
            if let Some(p) = pattern {
                Regex::new(p).with_context(|| format!("{field} is not a valid regex"))?;
            }
        }
        cordon_runtime::plugin::config::check_labels("agents", &self.agents)?;
        let stages = self.stages();
        for (i, stage) in stages.iter().enumerate() {
            if !stage.with.is_object() {
                bail!("pipeline.stages[{i}] ({}): `with` must be a mapping of options", stage.name);
            }
            globs(&stage.skip_on.paths).with_context(|| format!("pipeline.stages[{i}] ({}): skipOn.paths", stage.name))?;
        }
        self.dependencies()?;
        Ok(())
    }

    /// What an agent needs to run this application's deployments: the
    /// labels of `agents:`, the plugins that define its pipeline's stages
    /// and the plugins it has settings for (its planners among them).
    /// Stages a planner adds are defined by that planner, so they need
    /// nothing more.
    pub fn requirements(&self) -> cordon_store::Requirements {
        let mut stages: Vec<String> = self.stages().iter().map(|s| s.name.clone()).collect();
        stages.sort();
        stages.dedup();
        cordon_store::Requirements { labels: self.agents.clone(), stages, plugins: self.plugins.keys().cloned().collect() }
    }

    /// The configured pipeline stages (empty without a pipeline).
    pub fn stages(&self) -> &[StageConfig] {
        self.pipeline.as_ref().map_or(&[], |p| &p.stages)
    }

    /// For each configured stage, the indexes of the stages it needs; checks
    /// references and cycles.
    pub fn dependencies(&self) -> Result<Vec<Vec<usize>>> {
        let stages = self.stages();
        let mut by_key: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, s) in stages.iter().enumerate() {
            by_key.entry(s.key()).or_default().push(i);
        }
        if let Some((id, _)) = stages.iter().filter_map(|s| s.id.as_deref().map(|id| (id, ()))).find(|(id, _)| by_key[id].len() > 1) {
            bail!("two stages use the id `{id}`; stage ids must be unique");
        }
        let mut deps = Vec::with_capacity(stages.len());
        for (i, s) in stages.iter().enumerate() {
            let needed = match &s.needs {
                None if i == 0 => vec![],
                None => vec![i - 1],
                Some(refs) => {
                    let mut needed = Vec::new();
                    for r in refs {
                        match by_key.get(r.as_str()).map(Vec::as_slice) {
                            None | Some([]) => bail!("pipeline.stages[{i}] ({}) needs `{r}`, but no stage has that id or name", s.name),
                            Some([j]) if *j == i => bail!("pipeline.stages[{i}] ({}) needs itself", s.name),
                            Some([j]) => needed.push(*j),
                            Some(_) => bail!("pipeline.stages[{i}] ({}) needs `{r}`, which names several stages; give them distinct `id`s", s.name),
                        }
                    }
                    needed
                }
            };
            deps.push(needed);
        }
        // Cycle check: depth-first, reporting the cycle's stages.
        fn visit(i: usize, deps: &[Vec<usize>], state: &mut [u8], path: &mut Vec<usize>) -> Option<Vec<usize>> {
            match state[i] {
                2 => return None,
                1 => return Some(path[path.iter().position(|&p| p == i).unwrap_or(0)..].to_vec()),
                _ => {}
            }
            state[i] = 1;
            path.push(i);
            for &j in &deps[i] {
                if let Some(cycle) = visit(j, deps, state, path) {
                    return Some(cycle);
                }
            }
            path.pop();
            state[i] = 2;
            None
        }
        let mut state = vec![0u8; stages.len()];
        for i in 0..stages.len() {
            if let Some(cycle) = visit(i, &deps, &mut state, &mut Vec::new()) {
                let names: Vec<&str> = cycle.iter().map(|&j| stages[j].key()).collect();
                bail!("`needs` forms a cycle: {} -> {}", names.join(" -> "), names[0]);
            }
        }
        Ok(deps)
    }

    /// The deployment timeout.
    pub fn deployment_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_DEPLOYMENT_TIMEOUT)
    }

    /// The settings for `plugin`, as JSON text (`{}` when none).
    pub fn plugin_settings(&self, plugin: &str) -> String {
        self.plugins.get(plugin).map_or_else(|| "{}".to_string(), |v| v.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<AppConfig> {
        AppConfig::parse(yaml, Path::new("/apps/site/app.cordon.yaml"))
    }

    #[test]
    fn default_needs_chain_and_explicit_needs_fan_out() {
        let app = parse(
            "name: site\npipeline:\n  stages:\n    - name: A\n    - {name: B, id: b}\n    - {name: C, needs: [A]}\n    - {name: D, needs: [b, C]}\n",
        )
        .unwrap();
        assert_eq!(app.dependencies().unwrap(), vec![vec![], vec![0], vec![0], vec![1, 2]]);
        assert!(app.planner.auto_rollback);
        let app = parse("name: site\nagents: {env: prod}\nplugins: {files: {}}\npipeline:\n  stages:\n    - name: B\n    - name: A\n    - name: B\n").unwrap();
        let requires = app.requirements();
        assert_eq!((requires.labels["env"].as_str(), requires.stages, requires.plugins), ("prod", vec!["A".to_string(), "B".to_string()], vec!["files".to_string()]));
    }

    #[test]
    fn refuses_cycles_dangling_and_unknown_fields() {
        let cases = [
            ("name: s\npipeline:\n  stages:\n    - {name: A, needs: [B]}\n    - {name: B, needs: [A]}\n", "cycle: A -> B -> A"),
            ("name: s\npipeline:\n  stages:\n    - {name: A, needs: [NOPE]}\n", "needs `NOPE`, but no stage"),
            ("name: s\npipeline:\n  stages:\n    - {name: A}\n    - {name: A}\n    - {name: B, needs: [A]}\n", "names several stages"),
            ("name: s\npipeline:\n  stages:\n    - {name: A, wiht: {}}\n", "unknown field `wiht`"),
            ("name: s\nplanner: {commitMatcher: {quickSync: '('}}\n", "not a valid regex"),
            ("name: 'a b'\n", "application name"),
            ("name: s\nagents: {env: 'prod eu'}\n", "agents: label value \"prod eu\""),
        ];
        for (yaml, expected) in cases {
            let err = format!("{:#}", parse(yaml).unwrap_err());
            assert!(err.contains("/apps/site/app.cordon.yaml") && err.contains(expected), "{expected:?} not in {err}");
        }
    }

    #[test]
    fn skip_rules() {
        let skip = SkipOn { commit_message_prefixes: vec!["[skip]".into()], paths: vec!["docs/**".into()] };
        assert!(skip.reason("[skip] typo", &[]).is_some());
        assert!(skip.reason("fix", &["docs/a.md".into()]).is_some());
        assert!(skip.reason("fix", &["docs/a.md".into(), "index.html".into()]).is_none());
        assert!(skip.reason("fix", &[]).is_none());
    }
}
