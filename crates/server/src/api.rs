//! One request, from its token to its answer and its audit entry.
//!
//! The order is fixed: authenticate (401), read the arguments (400),
//! check the role ([`cordon_api::Access`]) and the token's reach (403),
//! check what the store would refuse less clearly (400, 404, 409), then
//! call the store. Nothing is written before the last step, so a refused
//! request changes nothing but the audit log. Every attempt at a method
//! that changes state is audited, allowed or refused, as is every refused
//! read — except an agent's allowed heartbeats and lease renewals, which
//! change only its own liveness and would flood the log (one every two
//! seconds per agent).

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use cordon_api::{Access, Call, MAX_WAIT_MS, Role, code};
use cordon_store::{AuditRecord, DeploymentRecord, DeploymentStatus, StateStore, is_safe_name, now_ms};

use crate::Refusal;
use crate::auth::{Caller, authenticate};

/// Largest `limit` a listing may ask for.
const MAX_LIMIT: usize = 10_000;

/// The answer to `POST /api/v1/<name>`: a JSON value or a refusal.
pub fn handle(store: &dyn StateStore, name: &str, auth: Option<&str>, body: &[u8], client: &str) -> Result<Value, Refusal> {
    let Some((access, writes)) = cordon_api::method(name) else {
        return Err(Refusal::new(404, code::NOT_FOUND, &format!("no method `{name}`; the methods are listed in {}", cordon_api::OPENAPI)));
    };
    let mut subject = "-".to_string();
    let mut target = "-".to_string();
    let mut quiet = false;
    let outcome = (|| {
        let caller = authenticate(store, auth)?;
        subject = caller.subject.clone();
        let args: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(body).map_err(|e| Refusal::bad(&format!("{name}: the body is not JSON ({e}); send the arguments as a JSON object")))?
        };
        storable("", &args).map_err(|e| Refusal::bad(&format!("{name}: {e}")))?;
        let call = Call::parse(name, args).map_err(|e| Refusal::bad(&format!("{name}: {e}")))?;
        target = target_of(&call);
        allow(&caller, access, &call)?;
        quiet = caller.role == Role::Agent && matches!(call, Call::Heartbeat { .. } | Call::Renew { .. });
        Gate { store, caller: &caller }.execute(call)
    })();
    if (writes && !quiet) || outcome.is_err() {
        audit(store, &subject, name, &target, client, outcome.as_ref().err());
    }
    outcome
}

/// Free-text fields: the store keeps a NUL in them as U+FFFD.
const FREE_TEXT: &[&str] = &["text", "reason", "message"];

/// Checks, before any field is read, what no store column can hold: a
/// number above `i64::MAX` (times, sizes and counts are stored signed),
/// or a NUL outside free text (PostgreSQL text cannot hold it).
fn storable(field: &str, value: &Value) -> Result<(), String> {
    match value {
        Value::Number(n) if n.as_i64().is_none() && n.as_u64().is_some() => {
            Err(format!("`{field}` is {n}; numbers above {} are not accepted", i64::MAX))
        }
        Value::String(s) if s.contains('\0') && !FREE_TEXT.contains(&field) => {
            Err(format!("`{field}` contains a NUL character; the state store cannot keep it"))
        }
        Value::Array(items) => items.iter().try_for_each(|v| storable(field, v)),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| if k.contains('\0') { Err("a field name contains a NUL character".into()) } else { storable(k, v) }),
        _ => Ok(()),
    }
}

/// Records one attempt in the audit log (an audit entry that cannot be
/// written is logged: the request's own outcome stands).
pub fn audit(store: &dyn StateStore, subject: &str, action: &str, target: &str, client: &str, refusal: Option<&Refusal>) {
    let entry = AuditRecord {
        seq: 0,
        at: now_ms(),
        subject: subject.to_string(),
        action: action.to_string(),
        target: target.to_string(),
        client: client.to_string(),
        outcome: refusal.map_or("ok".to_string(), |r| r.code.clone()),
    };
    if let Err(e) = store.audit_append(&entry) {
        tracing::error!("cannot write the audit entry {entry:?}: {e:#}");
    }
}

/// What a call is aimed at, for the audit log.
fn target_of(call: &Call) -> String {
    use Call::*;
    if let Some(fence) = call.fence() {
        return format!("deployment {}", fence.deployment);
    }
    match call {
        Application { name } | UpsertApplication { name, .. } => format!("application {name}"),
        BlobGet { application, .. } | DeleteDeployments { application, .. } => format!("application {application}"),
        InsertDeployment { deployment } => format!("deployment {}", deployment.id),
        Deployment { id } => format!("deployment {id}"),
        Deployments { application: Some(a), .. } => format!("application {a}"),
        ReplaceTargetSnapshot { deployment, .. }
        | Claim { deployment, .. }
        | RefusedWrites { deployment }
        | Lease { deployment }
        | Stages { deployment }
        | Logs { deployment, .. }
        | MetadataGet { deployment, .. }
        | MetadataEntries { deployment, .. }
        | Commands { deployment, .. } => format!("deployment {deployment}"),
        AddCommand { command } => format!("deployment {}", command.deployment),
        TokenInsert { token } => format!("token {}", token.id),
        TokenRevoke { id } => format!("token {id}"),
        Heartbeat { beat } => format!("agent {}", beat.id),
        Renew { agent, .. } => format!("agent {agent}"),
        _ => "-".to_string(),
    }
}

/// Whether the caller's role allows the method at all.
fn allow(caller: &Caller, access: Access, call: &Call) -> Result<(), Refusal> {
    let needed = match (access, call) {
        (Access::Read, _) => return Ok(()),
        (Access::Agent, _) if caller.role == Role::Agent => return Ok(()),
        (Access::Agent, _) => return Err(Refusal::forbidden(&format!("{} (role {}): only an agent's token may do this", caller.subject, caller.role))),
        (Access::Deploy, Call::AddCommand { command }) if command.kind == cordon_store::CommandKind::Approve => Role::Approver,
        (Access::Deploy, _) => Role::Deployer,
        (Access::Admin, _) => Role::Admin,
    };
    if caller.role.includes(needed) {
        Ok(())
    } else {
        Err(Refusal::forbidden(&format!("{} has role {}; this needs {needed} or above", caller.subject, caller.role)))
    }
}

/// The store, as one caller may use it.
pub struct Gate<'a> {
    pub store: &'a dyn StateStore,
    pub caller: &'a Caller,
}

impl Gate<'_> {
    fn application(&self, name: &str) -> Result<(), Refusal> {
        if self.caller.reaches(name) {
            Ok(())
        } else {
            Err(Refusal::forbidden(&format!("{}'s token does not reach application `{name}`", self.caller.subject)))
        }
    }

    /// Deployment `id`, if the caller reaches it: its application is in
    /// reach, and an agent holds its lease.
    fn deployment(&self, id: &str) -> Result<DeploymentRecord, Refusal> {
        let d = self.record(id)?;
        self.reach(&d)?;
        Ok(d)
    }

    /// Deployment `id` as stored (404 if there is none), not yet checked.
    fn record(&self, id: &str) -> Result<DeploymentRecord, Refusal> {
        self.store.deployment(id).map_err(Refusal::store)?.ok_or_else(|| Refusal::new(404, code::NOT_FOUND, &format!("no deployment `{id}`")))
    }

    /// Whether the caller reaches `d` (see [`Gate::deployment`]).
    fn reach(&self, d: &DeploymentRecord) -> Result<(), Refusal> {
        self.application(&d.application)?;
        if self.caller.role == Role::Agent && !self.holds(&d.id)? {
            return Err(Refusal::forbidden(&format!("agent {} does not hold deployment `{}`", self.caller.subject, d.id)));
        }
        Ok(())
    }

    fn holds(&self, id: &str) -> Result<bool, Refusal> {
        let lease = self.store.lease(id).map_err(Refusal::store)?;
        Ok(self.caller.holds(lease.as_ref().and_then(|(_, owner)| owner.as_deref())))
    }

    /// Whether a listed deployment is the caller's to see.
    fn sees(&self, d: &DeploymentRecord) -> Result<bool, Refusal> {
        Ok(self.caller.reaches(&d.application) && (self.caller.role != Role::Agent || self.holds(&d.id)?))
    }

    fn visible(&self, list: Vec<DeploymentRecord>) -> Result<Vec<DeploymentRecord>, Refusal> {
        let mut out = Vec::with_capacity(list.len());
        for d in list {
            if self.sees(&d)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Whether snapshot `reference` is one the caller may read: the
    /// running source of an application it reaches, or a source of an
    /// unfinished deployment it sees.
    pub fn may_read_snapshot(&self, reference: &str) -> Result<bool, Refusal> {
        let apps = self.store.applications().map_err(Refusal::store)?;
        if apps.iter().any(|a| self.caller.reaches(&a.name) && a.running_snapshot.as_deref() == Some(reference)) {
            return Ok(true);
        }
        let unfinished = self.visible(self.store.unfinished_deployments().map_err(Refusal::store)?)?;
        Ok(unfinished.iter().any(|d| d.target_snapshot == reference || d.running_snapshot == reference))
    }

    fn execute(&self, call: Call) -> Result<Value, Refusal> {
        use Call::*;
        let (store, caller) = (self.store, self.caller);
        let s = Refusal::store;
        let out = match call {
            Application { name } => {
                self.application(&name)?;
                json!(store.application(&name).map_err(s)?)
            }
            Applications {} => {
                let all = store.applications().map_err(s)?;
                json!(all.into_iter().filter(|a| caller.reaches(&a.name)).collect::<Vec<_>>())
            }
            UpsertApplication { name, dir } => {
                if !is_safe_name(&name) {
                    return Err(Refusal::bad(&format!("application name `{name}` is not a safe name; use letters, digits, `.`, `_` and `-`")));
                }
                self.application(&name)?;
                json!(store.upsert_application(&name, &dir).map_err(s)?)
            }
            InsertDeployment { mut deployment } => {
                self.application(&deployment.application)?;
                check_queued(&deployment)?;
                if store.deployment(&deployment.id).map_err(s)?.is_some() {
                    return Err(Refusal::new(409, code::CONFLICT, &format!("deployment `{}` exists already; give it a new id", deployment.id)));
                }
                if store.application(&deployment.application).map_err(s)?.is_none() {
                    return Err(Refusal::new(404, code::NOT_FOUND, &format!("no application `{}`; record it first (upsert_application)", deployment.application)));
                }
                deployment.created_at = now_ms();
                deployment.trigger = with_commander(&deployment.trigger, &caller.subject)?;
                json!(store.insert_deployment(&deployment).map_err(s)?)
            }
            Deployment { id } => match store.deployment(&id).map_err(s)? {
                // Callers ask to learn whether an id is free.
                None => json!(null),
                Some(d) => {
                    self.reach(&d)?;
                    json!(d)
                }
            },
            Deployments { application, limit } => {
                if let Some(app) = &application {
                    self.application(app)?;
                }
                json!(self.visible(store.deployments(application.as_deref(), limit.min(MAX_LIMIT)).map_err(s)?)?)
            }
            UnfinishedDeployments {} => json!(self.visible(store.unfinished_deployments().map_err(s)?)?),
            SavePlan { fence, plan, running_snapshot, stages, at } => {
                self.deployment(&fence.deployment)?;
                if stages.iter().any(|st| st.deployment != fence.deployment) {
                    return Err(Refusal::bad("save_plan: every stage must belong to the fence's deployment"));
                }
                json!(store.save_plan(&fence, &plan, &running_snapshot, &stages, at).map_err(s)?)
            }
            SetDeploymentStatus { fence, status, reason, at } => {
                self.deployment(&fence.deployment)?;
                json!(store.set_deployment_status(&fence, status, &reason, at).map_err(s)?)
            }
            CompleteSuccess { fence, reason, at } => {
                self.deployment(&fence.deployment)?;
                json!(store.complete_success(&fence, &reason, at).map_err(s)?)
            }
            ReplaceTargetSnapshot { deployment, from, to } => {
                self.deployment(&deployment)?;
                check_reference("to", &to)?;
                json!(store.replace_target_snapshot(&deployment, &from, &to).map_err(s)?)
            }
            DeleteDeployments { application, ids, grace_ms } => {
                self.application(&application)?;
                json!(store.delete_deployments(&application, &ids, Duration::from_millis(grace_ms)).map_err(s)?)
            }
            Claimable {} => {
                let all = store.claimable().map_err(s)?;
                json!(all.into_iter().filter(|d| caller.reaches(&d.application)).collect::<Vec<_>>())
            }
            Claim { deployment, agent, ttl_ms } => {
                // Not yet held: only its application must be within reach.
                self.application(&self.record(&deployment)?.application)?;
                json!(store.claim(&deployment, &caller.agent_id(&agent), ttl(ttl_ms)?).map_err(s)?)
            }
            Renew { agent, fences, ttl_ms } => json!(store.renew(&caller.agent_id(&agent), &fences, ttl(ttl_ms)?).map_err(s)?),
            Release { fence } => {
                // Idempotent: a release repeated after a lost answer finds no holder.
                match store.lease(&fence.deployment).map_err(s)? {
                    Some((_, None)) => json!(null),
                    Some((_, owner)) if caller.holds(owner.as_deref()) => {
                        self.deployment(&fence.deployment)?;
                        json!(store.release(&fence).map_err(s)?)
                    }
                    Some(_) => return Err(Refusal::new(409, code::FENCED, &format!("deployment {}: another agent holds its lease", fence.deployment))),
                    None => return Err(Refusal::new(404, code::NOT_FOUND, &format!("no deployment `{}`", fence.deployment))),
                }
            }
            ExpireLeases {} => json!(store.expire_leases().map_err(s)?),
            RefusedWrites { deployment } => {
                self.deployment(&deployment)?;
                json!(store.refused_writes(&deployment).map_err(s)?)
            }
            Lease { deployment } => {
                self.deployment(&deployment)?;
                json!(store.lease(&deployment).map_err(s)?)
            }
            Stages { deployment } => {
                self.deployment(&deployment)?;
                json!(store.stages(&deployment).map_err(s)?)
            }
            StartStage { fence, stage, at } => {
                self.deployment(&fence.deployment)?;
                json!(store.start_stage(&fence, &stage, at).map_err(s)?)
            }
            TransitionStage { fence, stage, from, to, message, at } => {
                self.deployment(&fence.deployment)?;
                json!(store.transition_stage(&fence, &stage, &from, to, &message, at).map_err(s)?)
            }
            ResetRunningStages { fence } => {
                self.deployment(&fence.deployment)?;
                json!(store.reset_running_stages(&fence).map_err(s)?)
            }
            AppendLogs { fence, lines } => {
                self.deployment(&fence.deployment)?;
                if lines.iter().any(|l| l.deployment != fence.deployment) {
                    return Err(Refusal::bad("append_logs: every line must belong to the fence's deployment"));
                }
                json!(store.append_logs(&fence, &lines).map_err(s)?)
            }
            Logs { deployment, stage, after_seq, limit, wait_ms } => {
                self.deployment(&deployment)?;
                let until = Instant::now() + Duration::from_millis(wait_ms.min(MAX_WAIT_MS));
                loop {
                    let lines = store.logs(&deployment, stage.as_deref(), after_seq, limit.min(MAX_LIMIT)).map_err(s)?;
                    if !lines.is_empty() || Instant::now() >= until {
                        break json!(lines);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            MetadataGet { deployment, stage, key } => {
                self.deployment(&deployment)?;
                json!(store.metadata_get(&deployment, &stage, &key).map_err(s)?)
            }
            MetadataPut { fence, stage, key, value } => {
                self.deployment(&fence.deployment)?;
                json!(store.metadata_put(&fence, &stage, &key, &value).map_err(s)?)
            }
            MetadataPutWithin { fence, stage, key, value, quota } => {
                self.deployment(&fence.deployment)?;
                json!(store.metadata_put_within(&fence, &stage, &key, &value, quota).map_err(s)?)
            }
            MetadataEntries { deployment, stage } => {
                self.deployment(&deployment)?;
                json!(store.metadata_entries(&deployment, &stage).map_err(s)?)
            }
            BlobGet { application, plugin, key } => {
                self.application(&application)?;
                json!(store.blob_get(&application, &plugin, &key).map_err(s)?.map(|v| STANDARD.encode(v)))
            }
            BlobPutWithin { fence, application, plugin, key, value, quota } => {
                let d = self.deployment(&fence.deployment)?;
                same_application(&d, &application)?;
                let value = STANDARD.decode(&value).map_err(|e| Refusal::bad(&format!("blob_put_within: `value` is not standard base64 ({e})")))?;
                json!(store.blob_put_within(&fence, &application, &plugin, &key, &value, quota).map_err(s)?)
            }
            BlobDelete { fence, application, plugin, key } => {
                let d = self.deployment(&fence.deployment)?;
                same_application(&d, &application)?;
                json!(store.blob_delete(&fence, &application, &plugin, &key).map_err(s)?)
            }
            AddCommand { mut command } => {
                let d = self.deployment(&command.deployment)?;
                if d.status.is_final() {
                    return Err(Refusal::new(409, code::CONFLICT, &format!("deployment `{}` has finished ({})", d.id, d.status)));
                }
                if command.answer.is_some() {
                    return Err(Refusal::bad("add_command: `answer` is the stage's to give; send none"));
                }
                command.commander = caller.subject.clone();
                command.created_at = now_ms();
                json!(store.add_command(&command).map_err(s)?)
            }
            Commands { deployment, stage } => {
                self.deployment(&deployment)?;
                json!(store.commands(&deployment, stage.as_deref()).map_err(s)?)
            }
            AnswerCommand { fence, stage, id, answer } => {
                self.deployment(&fence.deployment)?;
                json!(store.answer_command(&fence, &stage, &id, &answer).map_err(s)?)
            }
            Heartbeat { mut beat } => {
                beat.id = caller.agent_id(&beat.id);
                json!(store.heartbeat(&beat).map_err(s)?)
            }
            Agents {} => json!(store.agents().map_err(s)?),
            TokenInsert { mut token } => {
                cordon_api::check_record(&token).map_err(|e| Refusal::bad(&format!("token_insert: {e}")))?;
                if store.token(&token.id).map_err(s)?.is_some() {
                    return Err(Refusal::new(409, code::CONFLICT, &format!("token `{}` exists already", token.id)));
                }
                token.created_by = caller.subject.clone();
                token.created_at = now_ms();
                token.revoked_at = None;
                json!(store.token_insert(&token).map_err(s)?)
            }
            Tokens {} => {
                let mut tokens = store.tokens().map_err(s)?;
                tokens.iter_mut().for_each(|t| t.hash.clear());
                json!(tokens)
            }
            TokenRevoke { id } => json!(store.token_revoke(&id, now_ms()).map_err(s)?),
            Audit { after_seq, limit } => json!(store.audit(after_seq, limit.min(MAX_LIMIT)).map_err(s)?),
        };
        Ok(out)
    }
}

/// The trigger (JSON) with the authenticated subject as its commander.
fn with_commander(trigger: &str, subject: &str) -> Result<String, Refusal> {
    let mut value: Value = serde_json::from_str(trigger).map_err(|e| Refusal::bad(&format!("insert_deployment: `trigger` is not JSON ({e})")))?;
    let Some(object) = value.as_object_mut() else { return Err(Refusal::bad("insert_deployment: `trigger` is not a JSON object")) };
    object.insert("commander".into(), json!(subject));
    Ok(value.to_string())
}

fn ttl(ms: u64) -> Result<Duration, Refusal> {
    if (1_000..=3_600_000).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err(Refusal::bad(&format!("`ttl_ms` is {ms}; give 1000 to 3600000 (1 s to 1 h)")))
    }
}

fn same_application(d: &DeploymentRecord, application: &str) -> Result<(), Refusal> {
    if d.application == application {
        Ok(())
    } else {
        Err(Refusal::forbidden(&format!("deployment `{}` is of application `{}`, not `{application}`", d.id, d.application)))
    }
}

/// A stored snapshot's reference: `sha256:` and 64 hex digits.
pub fn check_reference(field: &str, reference: &str) -> Result<(), Refusal> {
    if cordon_store::is_snapshot_reference(reference) {
        Ok(())
    } else {
        Err(Refusal::bad(&format!("`{field}` must be a stored snapshot's reference, sha256: and 64 lowercase hex digits (upload the archive first)")))
    }
}

/// A deployment a person queues: waiting, unplanned, on a stored snapshot.
fn check_queued(d: &DeploymentRecord) -> Result<(), Refusal> {
    if d.status != DeploymentStatus::Queued || !d.plan.is_empty() || d.started_at.is_some() || d.finished_at.is_some() {
        return Err(Refusal::bad("insert_deployment: a new deployment is `queued`, with no plan and no start or finish time"));
    }
    if !is_safe_name(&d.id) {
        return Err(Refusal::bad(&format!("insert_deployment: id `{}` is not a safe name", d.id)));
    }
    check_reference("deployment.target_snapshot", &d.target_snapshot)?;
    if !d.running_snapshot.is_empty() {
        check_reference("deployment.running_snapshot", &d.running_snapshot)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_digests() {
        assert!(check_reference("to", &format!("sha256:{}", "a".repeat(64))).is_ok());
        for bad in ["/tmp/x", "sha256:", "sha256:../../etc", &format!("sha256:{}", "A".repeat(64))] {
            let err = check_reference("to", bad).unwrap_err();
            assert_eq!((err.status, err.code.as_str()), (400, code::BAD_REQUEST), "{bad}");
        }
    }
}
