//! Cordon runs deployment-stage plugins as WebAssembly components, each
//! confined to what its operator granted.
//!
//! Data flows one way: the agent config ([`plugin`]) names plugins and their
//! grants; the [`engine`] compiles and caches components; the [`sandbox`]
//! turns a grant into a fresh store per call; the [`runner`] performs one
//! call and turns every way it can end into an outcome with a reason; the
//! [`pipeline`] plans deployments and drives their stages on the durable
//! [`store`]; the [`agent`] runs queued deployments and resumes unfinished
//! ones; the [`cli`] is the only part that prints for humans.

pub mod agent;
pub mod cli;
pub mod contract;
pub mod debug;
pub mod engine;
pub mod keys;
pub mod migrate;
pub mod pipeline;
pub mod plugin;
pub mod runner;
pub mod sandbox;
pub mod store;
