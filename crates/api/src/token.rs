//! Tokens: what a caller shows, and what the store keeps of it.
//!
//! A token is `cordon_<id>_<secret>`: the id (`tok-` and 12 hex digits)
//! is public and names it in listings and the audit log; the secret is
//! 256 random bits in base64url. The store keeps only the secret's
//! SHA-256, so a copy of the database lets nobody in; the whole token is
//! shown once, when it is made.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail};
use globset::{Glob, GlobSet, GlobSetBuilder};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use cordon_store::TokenRecord;

/// What a token's holder may do. People's roles are ordered, each
/// allowing what the ones before it do: `viewer` reads, `deployer` also
/// deploys, plans with the server's state, uploads, skips, cancels and
/// continues breakpoints, `approver` also approves, `admin` also manages
/// tokens and reads the audit log. `agent` is a machine's: it claims and
/// runs deployments, and writes only those it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Deployer,
    Approver,
    Admin,
    Agent,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Viewer, Role::Deployer, Role::Approver, Role::Admin, Role::Agent];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Approver => "approver",
            Role::Admin => "admin",
            Role::Agent => "agent",
        }
    }

    /// Whether a person of this role may do what `needed` may (never true
    /// for an agent, whose rights are not a person's).
    pub fn includes(self, needed: Role) -> bool {
        self != Role::Agent && needed != Role::Agent && self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).with_context(|| {
            format!("unknown role `{s}`; use one of viewer, deployer, approver, admin, agent")
        })
    }
}

/// A token as its holder has it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}, secret hidden)", self.id)
    }
}

impl Token {
    /// A new token: a random id and 256 random bits of secret.
    pub fn generate() -> Result<Token> {
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        getrandom::fill(&mut id).and_then(|()| getrandom::fill(&mut secret)).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
        Ok(Token { id: format!("tok-{}", hex::encode(id)), secret: URL_SAFE_NO_PAD.encode(secret) })
    }

    /// The token in `text` (surrounding whitespace ignored); the error
    /// never repeats the text, which may be a secret.
    pub fn parse(text: &str) -> Result<Token> {
        let text = text.trim();
        let shape = "a token looks like cordon_tok-<12 hex digits>_<43 characters>; copy it whole from `cordon token create`";
        let Some((id, secret)) = text.strip_prefix("cordon_").and_then(|rest| rest.split_once('_')) else { bail!("not a cordon token: {shape}") };
        let id_ok = is_token_id(id);
        let secret_ok = URL_SAFE_NO_PAD.decode(secret).is_ok_and(|bytes| bytes.len() == 32);
        if !id_ok || !secret_ok {
            bail!("not a cordon token: {shape}");
        }
        Ok(Token { id: id.to_string(), secret: secret.to_string() })
    }

    /// What the store keeps: hex SHA-256 of the secret.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }

    /// Whether `record` is this token's (its hash matches, compared in
    /// constant time).
    pub fn matches(&self, record: &TokenRecord) -> bool {
        let (a, b) = (self.hash(), &record.hash);
        a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// The whole token, to show once or send as a bearer token.
    pub fn reveal(&self) -> String {
        format!("cordon_{}_{}", self.id, self.secret)
    }
}

/// A token id: `tok-` and 12 hex digits.
fn is_token_id(id: &str) -> bool {
    id.strip_prefix("tok-").is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The matcher of a token's application patterns (`*` wildcards).
pub fn patterns(applications: &[String]) -> Result<GlobSet> {
    let mut set = GlobSetBuilder::new();
    for p in applications {
        set.add(Glob::new(p).map_err(|e| anyhow!("application pattern `{p}`: {e}"))?);
    }
    Ok(set.build()?)
}

/// Checks a token record before it is stored, wherever it is made (the
/// command line on the database, or the server); each error names the
/// field and the fix.
pub fn check_record(t: &TokenRecord) -> Result<()> {
    let hash_ok = t.hash.len() == 64 && t.hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !is_token_id(&t.id) || !hash_ok {
        bail!("`id` is tok- and 12 hex digits and `hash` 64 lowercase hex digits; make tokens with `cordon token create`");
    }
    // `:` separates an agent's subject from its process in lease owners.
    if t.subject.is_empty() || t.subject.len() > 128 || t.subject.chars().any(|c| c.is_control() || c == ':') {
        bail!("`subject` is 1-128 characters, no control characters or `:`");
    }
    t.role.parse::<Role>().map_err(|e| anyhow!("`role`: {e}"))?;
    if t.applications.is_empty() {
        bail!("`applications` is empty; give name patterns, `*` for every application");
    }
    patterns(&t.applications).map_err(|e| anyhow!("`applications`: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_errors_keep_the_secret() {
        let token = Token::generate().unwrap();
        let parsed = Token::parse(&format!("  {}\n", token.reveal())).unwrap();
        assert_eq!(parsed, token);
        assert_ne!(Token::generate().unwrap(), token);
        let record = TokenRecord {
            id: token.id.clone(),
            hash: token.hash(),
            subject: "s".into(),
            role: "viewer".into(),
            applications: vec![],
            created_at: 0,
            created_by: String::new(),
            expires_at: None,
            revoked_at: None,
        };
        assert!(token.matches(&record));
        assert!(!Token::generate().unwrap().matches(&record));
        let wrong = format!("{}x", token.reveal());
        let err = Token::parse(&wrong).unwrap_err().to_string();
        assert!(!err.contains(&wrong[20..]) && err.contains("cordon token create"), "{err}");
        assert!(!format!("{token:?}").contains(&token.reveal()[25..]));
    }

    /// Every field a stored token could be wrong in is named.
    #[test]
    fn token_records_are_checked_field_by_field() {
        let token = Token::generate().unwrap();
        let good = TokenRecord {
            id: token.id.clone(),
            hash: token.hash(),
            subject: "alice".into(),
            role: "approver".into(),
            applications: vec!["web-*".into()],
            created_at: 0,
            created_by: String::new(),
            expires_at: None,
            revoked_at: None,
        };
        check_record(&good).unwrap();
        let bad: [(&str, TokenRecord); 6] = [
            ("`id`", TokenRecord { id: "tok-xyz".into(), ..good.clone() }),
            ("`hash`", TokenRecord { hash: "AB".repeat(32), ..good.clone() }),
            ("`subject`", TokenRecord { subject: "prod:h/1".into(), ..good.clone() }),
            ("`role`", TokenRecord { role: "root".into(), ..good.clone() }),
            ("`applications` is empty", TokenRecord { applications: vec![], ..good.clone() }),
            ("`applications`: application pattern `[`", TokenRecord { applications: vec!["[".into()], ..good.clone() }),
        ];
        for (field, record) in bad {
            let err = check_record(&record).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn people_roles_are_ordered_and_agents_apart() {
        assert!(Role::Admin.includes(Role::Approver) && Role::Approver.includes(Role::Deployer));
        assert!(!Role::Deployer.includes(Role::Approver) && !Role::Viewer.includes(Role::Deployer));
        assert!(!Role::Agent.includes(Role::Viewer) && !Role::Admin.includes(Role::Agent));
        assert_eq!("approver".parse::<Role>().unwrap(), Role::Approver);
        assert!("root".parse::<Role>().unwrap_err().to_string().contains("viewer, deployer"));
    }
}
