//! The `store` interface of migration phases: source and destination
//! handles over key/value stores, already scoped by the migration.
//!
//! The sandbox only routes calls: a phase step's run is granted a
//! [`MigrationStores`] (by `migrate`), which decides what a handle may see
//! and do — selected keys only, writes and deletes only under the
//! migration's claim, deletes only after `verify` passed. A run without
//! that grant (every other kind of plugin) gets an error from every call.

use std::sync::Arc;

use wasmtime::component::Resource;

use crate::contract::bindings::migration_phase::cordon::plugin::store;
pub use store::{Budget, Entry, Page};

use super::RunState;

/// The guest's source handle; what it reaches is the run's [`MigrationStores`].
pub struct SourceHandle;
/// The guest's destination handle.
pub struct DestinationHandle;

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

impl RunState {
    fn stores(&self) -> Result<Arc<dyn MigrationStores>, String> {
        self.stores.clone().ok_or_else(|| "no migration stores are granted to this run".to_string())
    }
}

type Answer<T> = wasmtime::Result<Result<T, String>>;

impl store::Host for RunState {}

impl store::HostSource for RunState {
    async fn scan(&mut self, _: Resource<SourceHandle>, token: Option<String>, budget: Budget) -> Answer<Page> {
        Ok(match self.stores() {
            Ok(s) => s.source_scan(token, budget).await,
            Err(e) => Err(e),
        })
    }

    async fn get(&mut self, _: Resource<SourceHandle>, key: Vec<u8>) -> Answer<Option<Vec<u8>>> {
        Ok(match self.stores() {
            Ok(s) => s.source_get(key).await,
            Err(e) => Err(e),
        })
    }

    async fn delete(&mut self, _: Resource<SourceHandle>, keys: Vec<Vec<u8>>) -> Answer<u32> {
        Ok(match self.stores() {
            Ok(s) => s.source_delete(keys).await,
            Err(e) => Err(e),
        })
    }

    async fn claim(&mut self, _: Resource<SourceHandle>) -> Answer<()> {
        Ok(match self.stores() {
            Ok(s) => s.claim().await,
            Err(e) => Err(e),
        })
    }

    async fn drop(&mut self, handle: Resource<SourceHandle>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        Ok(())
    }
}

impl store::HostDestination for RunState {
    async fn put(&mut self, _: Resource<DestinationHandle>, entries: Vec<Entry>) -> Answer<()> {
        Ok(match self.stores() {
            Ok(s) => s.destination_put(entries).await,
            Err(e) => Err(e),
        })
    }

    async fn get(&mut self, _: Resource<DestinationHandle>, key: Vec<u8>) -> Answer<Option<Vec<u8>>> {
        Ok(match self.stores() {
            Ok(s) => s.destination_get(key).await,
            Err(e) => Err(e),
        })
    }

    async fn scan(&mut self, _: Resource<DestinationHandle>, token: Option<String>, budget: Budget) -> Answer<Page> {
        Ok(match self.stores() {
            Ok(s) => s.destination_scan(token, budget).await,
            Err(e) => Err(e),
        })
    }

    async fn drop(&mut self, handle: Resource<DestinationHandle>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        Ok(())
    }
}
