//! One module per command: each parses its arguments (a clap struct or
//! subcommand enum), calls the layer that owns the work, and prints.

pub mod agent;
pub mod control;
pub mod debug;
pub mod deploy;
pub mod keys;
pub mod logs;
pub mod migrate;
pub mod plan;
pub mod plugin;
pub mod stage;
pub mod status;
pub mod transfer;
pub mod trigger;
pub mod upload;
