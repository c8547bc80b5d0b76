//! Who is calling, and what they may reach.
//!
//! Every request carries `Authorization: Bearer <token>`. The token's id
//! finds its record; the secret's hash must match, and the token must be
//! neither revoked nor expired — each checked on every request, so a
//! revocation takes effect at once on every replica. A token reaches the
//! applications its patterns match (`*` wildcards); an agent's token
//! writes only deployments whose lease that agent holds, and it holds a
//! lease under its own subject ([`Caller::agent_id`]), so one agent's
//! token cannot pass for another's.

use globset::GlobSet;

use cordon_api::{Role, Token, code, patterns};
use cordon_store::{StateStore, now_ms};

use crate::Refusal;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub subject: String,
    pub role: Role,
    applications: GlobSet,
}

impl Caller {
    /// Whether the token may reach application `name`.
    pub fn reaches(&self, application: &str) -> bool {
        self.applications.is_match(application)
    }

    /// The id an agent's claims, renewals and heartbeats are recorded
    /// under: its subject, then the id it gave (`HOST/PID`).
    pub fn agent_id(&self, given: &str) -> String {
        format!("{}:{given}", self.subject)
    }

    /// Whether `owner` (a lease's holder) is this agent.
    pub fn holds(&self, owner: Option<&str>) -> bool {
        self.role == Role::Agent && owner.is_some_and(|o| o.strip_prefix(&self.subject).is_some_and(|rest| rest.starts_with(':')))
    }
}

/// The caller behind `header` (the `Authorization` header's value).
pub fn authenticate(store: &dyn StateStore, header: Option<&str>) -> Result<Caller, Refusal> {
    let unauthenticated = |message: &str| Refusal::new(401, code::UNAUTHENTICATED, message);
    let Some(value) = header else {
        return Err(unauthenticated("no token: send `Authorization: Bearer <token>` (make one with `cordon token create`)"));
    };
    let Some(text) = value.strip_prefix("Bearer ") else {
        return Err(unauthenticated("the Authorization header is not `Bearer <token>`"));
    };
    let token = Token::parse(text).map_err(|e| unauthenticated(&e.to_string()))?;
    let record = store.token(&token.id).map_err(Refusal::store)?;
    let Some(record) = record.filter(|r| token.matches(r)) else {
        return Err(unauthenticated(&format!("token {} is not known here; ask an admin for a token", token.id)));
    };
    if record.revoked_at.is_some() {
        return Err(unauthenticated(&format!("token {} was revoked; ask an admin for a new one", record.id)));
    }
    if record.expires_at.is_some_and(|at| at <= now_ms()) {
        return Err(unauthenticated(&format!("token {} has expired; ask an admin for a new one", record.id)));
    }
    let role: Role = record.role.parse().map_err(|e: anyhow::Error| unauthenticated(&format!("token {}: {e}", record.id)))?;
    let applications = patterns(&record.applications).map_err(|e| unauthenticated(&format!("token {}: {e}", record.id)))?;
    Ok(Caller { subject: record.subject, role, applications })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_holds_only_its_own_leases() {
        let caller = Caller { subject: "prod".into(), role: Role::Agent, applications: patterns(&["web-*".into()]).unwrap() };
        assert!(caller.holds(Some(&caller.agent_id("h/1"))));
        assert!(!caller.holds(Some("production:h/1")) && !caller.holds(Some("h/1")) && !caller.holds(None));
        assert!(caller.reaches("web-a") && !caller.reaches("api"));
        let person = Caller { role: Role::Admin, ..caller };
        assert!(!person.holds(Some("prod:h/1")), "a person holds no lease");
    }
}
