//! Migration-store capability: the `store` interface of migration phases,
//! source and destination handles over key/value stores already scoped by
//! the migration.
//!
//! The sandbox only routes calls: a phase step's run is granted a
//! [`MigrationStores`] (by the migration crate), which decides what a handle
//! may see and do — selected keys only, writes and deletes only under the
//! migration's claim, deletes only after `verify` passed. Every other run
//! holds [`NotGranted`], which refuses every call. Handles carry nothing
//! (what they reach is the run's grant), so they are not kept in the
//! resource table.

use std::sync::Arc;

use anyhow::Result;
use wasmtime::component::{HasSelf, Linker, Resource};

pub use cordon_contract::bindings::migration_phase::cordon::plugin::store::{Budget, Entry, Page};
use cordon_contract::bindings::migration_phase::cordon::plugin::store;
use cordon_contract::{DestinationHandle, SourceHandle};

use super::RunState;

/// The handles a step receives.
pub struct Handles {
    pub source: Resource<SourceHandle>,
    pub destination: Resource<DestinationHandle>,
}

/// What a phase's handles do; errors go to the guest as the call's error.
#[async_trait::async_trait]
pub trait MigrationStores: Send + Sync {
    async fn source_scan(&self, token: Option<String>, budget: Budget) -> Result<Page, String>;
    async fn source_get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, String>;
    async fn source_delete(&self, keys: Vec<Vec<u8>>) -> Result<u32, String>;
    async fn claim(&self) -> Result<(), String>;
    async fn destination_put(&self, entries: Vec<Entry>) -> Result<(), String>;
    async fn destination_get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, String>;
    async fn destination_scan(&self, token: Option<String>, budget: Budget) -> Result<Page, String>;
}

/// The stores of a run that was granted none.
pub struct NotGranted;

const NOT_GRANTED: &str = "no migration stores are granted to this run";

#[async_trait::async_trait]
impl MigrationStores for NotGranted {
    async fn source_scan(&self, _: Option<String>, _: Budget) -> Result<Page, String> {
        Err(NOT_GRANTED.into())
    }
    async fn source_get(&self, _: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        Err(NOT_GRANTED.into())
    }
    async fn source_delete(&self, _: Vec<Vec<u8>>) -> Result<u32, String> {
        Err(NOT_GRANTED.into())
    }
    async fn claim(&self) -> Result<(), String> {
        Err(NOT_GRANTED.into())
    }
    async fn destination_put(&self, _: Vec<Entry>) -> Result<(), String> {
        Err(NOT_GRANTED.into())
    }
    async fn destination_get(&self, _: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        Err(NOT_GRANTED.into())
    }
    async fn destination_scan(&self, _: Option<String>, _: Budget) -> Result<Page, String> {
        Err(NOT_GRANTED.into())
    }
}

/// The stores one run reaches.
pub struct Stores(Arc<dyn MigrationStores>);

impl Default for Stores {
    fn default() -> Self {
        Stores(Arc::new(NotGranted))
    }
}

impl Stores {
    /// Grants `stores` to the run and returns the handles to pass its step.
    pub fn grant(&mut self, stores: Arc<dyn MigrationStores>) -> Handles {
        self.0 = stores;
        Handles { source: Resource::new_own(0), destination: Resource::new_own(0) }
    }
}

pub(super) fn add_to_linker(linker: &mut Linker<RunState>) -> wasmtime::Result<()> {
    store::add_to_linker::<_, HasSelf<Stores>>(linker, |s| &mut s.stores)
}

type Answer<T> = wasmtime::Result<Result<T, String>>;

impl store::Host for Stores {}

impl store::HostSource for Stores {
    async fn scan(&mut self, _: Resource<SourceHandle>, token: Option<String>, budget: Budget) -> Answer<Page> {
        Ok(self.0.source_scan(token, budget).await)
    }

    async fn get(&mut self, _: Resource<SourceHandle>, key: Vec<u8>) -> Answer<Option<Vec<u8>>> {
        Ok(self.0.source_get(key).await)
    }

    async fn delete(&mut self, _: Resource<SourceHandle>, keys: Vec<Vec<u8>>) -> Answer<u32> {
        Ok(self.0.source_delete(keys).await)
    }

    async fn claim(&mut self, _: Resource<SourceHandle>) -> Answer<()> {
        Ok(self.0.claim().await)
    }

    async fn drop(&mut self, _: Resource<SourceHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl store::HostDestination for Stores {
    async fn put(&mut self, _: Resource<DestinationHandle>, entries: Vec<Entry>) -> Answer<()> {
        Ok(self.0.destination_put(entries).await)
    }

    async fn get(&mut self, _: Resource<DestinationHandle>, key: Vec<u8>) -> Answer<Option<Vec<u8>>> {
        Ok(self.0.destination_get(key).await)
    }

    async fn scan(&mut self, _: Resource<DestinationHandle>, token: Option<String>, budget: Budget) -> Answer<Page> {
        Ok(self.0.destination_scan(token, budget).await)
    }

    async fn drop(&mut self, _: Resource<DestinationHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}
