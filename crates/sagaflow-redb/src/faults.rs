//! Failures injected into the log's files, for tests: a redb storage backend whose writes fail
//! on demand, and a switch the write-ahead file's appends look at.

use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// What fails, switched by the test.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Writes, syncs and resizes of the database file fail.
    pub(crate) redb: AtomicBool,
    /// Write-ahead appends fail after writing the entry, before syncing it.
    pub(crate) wal: AtomicBool,
    /// Failures injected so far.
    pub(crate) injected: AtomicU64,
}

impl Faults {
    fn check(&self, switch: &AtomicBool) -> io::Result<()> {
        if switch.load(Ordering::SeqCst) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(no_space());
        }
        Ok(())
    }
}

/// The error a full disk gives.
pub(crate) fn no_space() -> io::Error {
    io::Error::from_raw_os_error(28)
}

/// The database file, failing when [`Faults::redb`] is on.
#[derive(Debug)]
pub(crate) struct FaultyBackend {
    inner: FileBackend,
    faults: Arc<Faults>,
}

impl FaultyBackend {
    pub(crate) fn new(file: File, faults: Arc<Faults>) -> Self {
        Self { inner: FileBackend::new(file).expect("a file backend"), faults }
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.faults.check(&self.faults.redb)?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.faults.check(&self.faults.redb)?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.faults.check(&self.faults.redb)?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
