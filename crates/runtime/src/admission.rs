//! Admission to the instance pool, so that no plugin takes the slots that
//! other plugins need.
//!
//! The pooling allocator has fixed numbers of component instances, core
//! instances, memories and tables for the whole agent; when one runs out,
//! instantiation fails — whichever plugin asked. So each call is admitted
//! before it instantiates: its *weight* is the largest fraction of any of
//! those pools that one instance of its component takes (known from the
//! component's shape at load), and the calls alive at once may weigh at
//! most the whole pool, so instantiation never fails for want of a slot.
//! One plugin's calls together may weigh at most [`PLUGIN_SHARE`] of the
//! pool, so a plugin that runs many calls at once (or is made of many
//! parts) leaves the rest to the others. A call that is not admitted
//! waits; the wait counts toward its timeout.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use cordon_contract::Shape;

/// Units of the whole pool; a call's weight is a number of them.
const UNITS: u32 = 1 << 16;

/// The part of the pool one plugin's calls may hold at once.
pub const PLUGIN_SHARE: u32 = 4;

/// The pool's sizes, and the units of it not held by a call.
#[derive(Debug)]
pub struct Pool {
    free: Arc<Semaphore>,
    pub components: u32,
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
}

impl Pool {
    pub fn new(components: u32, core_instances: u32, memories: u32, tables: u32) -> Self {
        Self { free: Arc::new(Semaphore::new(UNITS as usize)), components, core_instances, memories, tables }
    }

    /// The slots of a plugin whose component has `shape`; an error when one
    /// instance alone needs more than a plugin's share.
    pub fn slots(&self, shape: &Shape) -> Result<Slots, String> {
        let fraction = |need: u32, total: u32| (u64::from(need) * u64::from(UNITS)).div_ceil(u64::from(total.max(1)));
        let weight = [
            fraction(1, self.components),
            fraction(shape.core_instances, self.core_instances),
            fraction(shape.memories, self.memories),
            fraction(shape.tables, self.tables),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let share = UNITS / PLUGIN_SHARE;
        if weight > u64::from(share) {
            return Err(format!(
                "one instance of it needs more than 1/{PLUGIN_SHARE} of the agent's instance pool ({} core instances, {} memories, {} tables)",
                self.core_instances, self.memories, self.tables
            ));
        }
        Ok(Slots(Some(Pooled { weight: weight as u32, plugin: Arc::new(Semaphore::new(share as usize)), pool: self.free.clone() })))
    }
}

/// What one plugin's calls draw on; None when instances do not come from
/// a pool.
#[derive(Debug, Clone)]
pub struct Slots(Option<Pooled>);

/// A plugin's weight per call, its own share, and the pool.
#[derive(Debug, Clone)]
struct Pooled {
    weight: u32,
    plugin: Arc<Semaphore>,
    pool: Arc<Semaphore>,
}

impl Slots {
    /// Slots of an engine without a pool: every call is admitted at once.
    pub fn unpooled() -> Self {
        Self(None)
    }

    /// Waits until a call may instantiate; the call holds its slots until
    /// the returned admission is dropped (after its store).
    pub async fn admit(&self) -> Admission {
        let Some(p) = &self.0 else { return Admission { _held: None } };
        // Always the plugin's share first, then the pool: one order, so
        // waiting calls cannot hold each other up in a cycle.
        let own = p.plugin.clone().acquire_many_owned(p.weight).await.expect("never closed");
        let pooled = p.pool.clone().acquire_many_owned(p.weight).await.expect("never closed");
        Admission { _held: Some((own, pooled)) }
    }
}

/// A call's hold on its slots.
#[derive(Debug)]
pub struct Admission {
    _held: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(core_instances: u32, memories: u32, tables: u32) -> Shape {
        Shape { core_modules: core_instances, core_instances, memories, tables }
    }

    /// A plugin's calls stop at its share of the pool, and the rest stays
    /// free for others.
    #[tokio::test]
    async fn one_plugin_holds_at_most_its_share() {
        let pool = Pool::new(256, 1024, 256, 1024);
        let greedy = pool.slots(&shape(128, 2, 16)).unwrap();
        let first = greedy.admit().await;
        let second = greedy.admit().await;
        let third = tokio::time::timeout(std::time::Duration::from_millis(50), greedy.admit()).await;
        assert!(third.is_err(), "a third call of 1/8 of the pool passes the plugin's share");
        let other = pool.slots(&shape(10, 1, 2)).unwrap();
        // 10 core instances of 1024: 25 calls fill that plugin's own share.
        let _held = admit_many(&other, 25).await;
        drop((first, second));
        tokio::time::timeout(std::time::Duration::from_secs(1), greedy.admit()).await.expect("admitted once slots are free");
    }

    async fn admit_many(slots: &Slots, n: usize) -> Vec<Admission> {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(tokio::time::timeout(std::time::Duration::from_secs(1), slots.admit()).await.expect("room for others"));
        }
        held
    }

    #[test]
    fn a_shape_bigger_than_a_share_is_refused() {
        let pool = Pool::new(16, 64, 16, 64);
        assert!(pool.slots(&shape(32, 1, 2)).unwrap_err().contains("1/4 of the agent's instance pool"));
        assert!(pool.slots(&shape(16, 1, 2)).is_ok());
    }
}
