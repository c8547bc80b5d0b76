//! Cordon's host runtime: everything between a plugin's bytes and one
//! confined call of it.
//!
//! Data flows one way: the agent config ([`plugin::config`]) names plugins
//! and their grants; [`plugin`] verifies a component (pin, signature,
//! world, manifest) before the [`engine`] compiles and caches it; the
//! [`sandbox`] turns a grant into a fresh store per call; [`call`] runs one
//! export under the call's budgets and turns every way it can end into a
//! typed [`call::RunError`]; the [`runner`] offers the calls of each world.
//! Nothing here knows about deployments or durable state: the pipeline and
//! migration crates bring those through the sandbox's service traits.

pub mod admission;
pub mod call;
pub mod engine;
pub mod errno;
pub mod files;
pub mod plugin;
pub mod runner;
pub mod sandbox;
