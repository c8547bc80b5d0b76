//! `cordon completions SHELL`: a completion script for the shell, made by
//! `clap_complete` from the same definitions that parse the command line.

use std::process::ExitCode;

use anyhow::Result;

/// Print a shell completion script (e.g. `cordon completions bash > /etc/bash_completion.d/cordon`).
#[derive(clap::Args)]
pub struct Completions {
    shell: clap_complete::Shell,
}

impl Completions {
    pub fn run(self, mut command: clap::Command) -> Result<ExitCode> {
        clap_complete::generate(self.shell, &mut command, "cordon", &mut std::io::stdout());
        Ok(ExitCode::SUCCESS)
    }
}
