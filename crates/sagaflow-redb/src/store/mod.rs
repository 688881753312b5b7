//! The [`SagaLog`](sagaflow::log::SagaLog) over redb: reads in read transactions, every write
//! through one writer thread that group-commits whatever is queued.
//!
//! - [`handle`]: what callers hold; reads look in the [`overlay`], then the file.
//! - [`request`]: what callers send the writer, and how answers get back.
//! - [`shared`]: what the handle and the writer share (the open file, whether writes are
//!   refused, counts).
//! - [`writer`]: the writer thread, batching requests into write-ahead entries, with the
//!   [`cache`] of the records it is working on.
//! - [`checkpoint`]: applying those entries to the database file on a thread of its own.
//! - [`replay`]: opening the file and replaying the write-ahead file into it.
//! - [`tables`]: the tables, their keys, and the record encoding.

mod cache;
mod checkpoint;
mod handle;
mod overlay;
mod replay;
mod request;
mod shared;
pub(crate) mod tables;
mod writer;

#[cfg(test)]
mod damage_tests;
#[cfg(test)]
mod outage_tests;
#[cfg(test)]
mod paging_tests;
#[cfg(test)]
pub(crate) mod tests;

pub use handle::{ListReads, RedbSagaLog, WriteStats};
pub(crate) use request::Request;
pub(crate) use tables::{Tables, decode};
