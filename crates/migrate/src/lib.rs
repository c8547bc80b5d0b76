//! Moving data through components: [`keys`] filters key spaces with
//! key-filter plugins, [`items`] rewrites JSON items with item actions,
//! migrations move one unit of keys between stores through phase plugins,
//! and [`transfer`] backs up and restores Cordon's own state.
//!
//! # Migrations
//!
//! A migration moves the keys of one *unit* — the keys a key-filter plugin
//! selects from a source store, e.g. one kcp logical cluster — to a
//! destination store, through phase plugins (`migration-phase` world) that
//! the host drives step by step:
//!
//! - the [`spec`] says what moves where, through which phases, in which
//!   page budgets, and what each phase does with errors;
//! - [`kv`] holds the stores (etcd v3, SQLite);
//! - [`scope`] is what a phase sees: store handles limited to the selected
//!   keys, writes only under the unit's claim, deletes only after `verify`
//!   passed, continue tokens bound to the migration;
//! - [`ledger`] is the durable record: after every step the checkpoint and
//!   the progress it stands for are committed together, so a crash loses at
//!   most the step in flight, which is repeated (phases are idempotent);
//! - [`run`] drives the phases and reports progress.
//!
//! Safety does not rest on the phase plugins: a plugin that deletes before
//! `verify`, writes outside the selection, or claims a unit another
//! migration holds is refused by the host.

pub mod items;
pub mod keys;
pub mod kv;
pub mod ledger;
pub mod run;
pub mod scope;
pub mod spec;
pub mod transfer;

pub use ledger::{Ledger, Migration, PhaseProgress, Status};
pub use spec::MigrationSpec;
