//! `cordon token create|list|revoke`: the server's tokens. Made here,
//! shown once, stored as a hash. Against a server this needs an admin
//! token; the first admin token is made with the database itself
//! (`--server-config` on the server's machine, or the agent config).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use cordon_api::{Role, Token};
use cordon_store::{StateStore, TokenRecord, now_ms};

use crate::print::escape;

#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (once: only its hash is kept).
    Create {
        /// Who will use it: a person, or an agent's name.
        #[arg(long)]
        subject: String,
        /// viewer, deployer, approver, admin (each allows what the ones
        /// before it do), or agent.
        #[arg(long)]
        role: String,
        /// Application name patterns it reaches (comma-separated, `*`
        /// wildcards).
        #[arg(long, default_value = "*")]
        applications: String,
        /// How long it lasts (e.g. 90d); for ever if not given.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
        #[command(flatten)]
        direct: Direct,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        direct: Direct,
    },
    /// Revoke a token at once, on every server replica.
    Revoke {
        id: String,
        #[command(flatten)]
        direct: Direct,
    },
}

/// Open the server's database directly instead of calling a server.
#[derive(clap::Args)]
pub struct Direct {
    /// The server's config: act on its state directly (to make the first
    /// admin token, on the server's machine).
    #[arg(long = "server-config")]
    server_config: Option<PathBuf>,
}

impl Direct {
    pub fn store(&self, config_path: &Path) -> Result<Arc<dyn StateStore>> {
        match &self.server_config {
            Some(path) => cordon_server::ServerConfig::load(path)?.open_store(),
            None => super::state(config_path),
        }
    }
}

impl TokenCommand {
    pub fn run(self, config_path: &Path) -> Result<ExitCode> {
        match self {
            TokenCommand::Create { subject, role, applications, expires, direct } => {
                let role: Role = role.parse()?;
                let applications: Vec<String> = applications.split(',').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect();
                let token = Token::generate()?;
                let now = now_ms();
                let record = TokenRecord {
                    id: token.id.clone(),
                    hash: token.hash(),
                    subject: subject.clone(),
                    role: role.to_string(),
                    applications,
                    created_at: now,
                    created_by: super::trigger::user(),
                    expires_at: expires.map(|d| now + d.as_millis() as u64),
                    revoked_at: None,
                };
                cordon_api::check_record(&record).with_context(|| format!("token for --subject `{}` refused", escape(&subject)))?;
                direct.store(config_path)?.token_insert(&record)?;
                eprintln!("token {} for {subject} ({role}); it is shown once — keep it in a file of mode 0600:", token.id);
                println!("{}", token.reveal());
                Ok(ExitCode::SUCCESS)
            }
            TokenCommand::List { direct } => {
                let store = direct.store(config_path)?;
                let now = now_ms();
                let mut out = std::io::stdout().lock();
                writeln!(out, "{:<17} {:<16} {:<9} {:<8} {:<24} CREATED BY", "ID", "SUBJECT", "ROLE", "STATE", "APPLICATIONS")?;
                for t in store.tokens()? {
                    let state = match (t.revoked_at, t.expires_at) {
                        (Some(_), _) => "revoked",
                        (None, Some(at)) if at <= now => "expired",
                        _ => "active",
                    };
                    writeln!(out, "{:<17} {:<16} {:<9} {:<8} {:<24} {}", t.id, escape(&t.subject), t.role, state, t.applications.join(","), escape(&t.created_by))?;
                }
                Ok(ExitCode::SUCCESS)
            }
            TokenCommand::Revoke { id, direct } => {
                if direct.store(config_path)?.token_revoke(&id, now_ms())? {
                    println!("token {id} revoked");
                    Ok(ExitCode::SUCCESS)
                } else {
                    bail!("no active token `{id}`; `cordon token list` shows them")
                }
            }
        }
    }
}
