//! Streaming keys through key-filter plugins: [`filter`] selects keys,
//! reading them with [`etcd_dump`] or line by line into [`batch`]es.
//!
//! Input is read in batches, work happens on a bounded number
//! of batches at a time, and output is written in input order, so memory
//! stays constant however large the input.

pub mod batch;
pub mod etcd_dump;
pub mod filter;
