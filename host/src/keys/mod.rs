//! Streaming keys and items through plugins: [`filter`] selects keys with a
//! key-filter component, [`items`] rewrites JSON items with an item action.
//!
//! Both stream: input is read in batches, work happens on a bounded number
//! of batches at a time, and output is written in input order, so memory
//! stays constant however large the input.

pub mod etcd_dump;
pub mod filter;
pub mod items;
