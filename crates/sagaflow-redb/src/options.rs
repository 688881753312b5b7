//! How to open the embedded saga log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sagaflow::log::Retention;

/// Name of the database file inside the data directory.
pub const FILE_NAME: &str = "sagas.redb";

/// The default size of redb's page cache: 32 MiB.
pub const DEFAULT_CACHE_SIZE: usize = 32 << 20;

/// Where the log lives and how it writes and prunes.
#[derive(Debug, Clone)]
pub struct RedbOptions {
    pub(crate) data_dir: PathBuf,
    pub(crate) retention: Retention,
    pub(crate) prune_interval: Duration,
    pub(crate) prune_chunk: usize,
    pub(crate) max_batch: usize,
    pub(crate) linger: Duration,
    pub(crate) defer_queued: Duration,
    pub(crate) cache_size: usize,
    pub(crate) checkpoint_interval: Duration,
    pub(crate) wal_size: u64,
    pub(crate) salvage_wal: bool,
    /// Failures to inject, in tests.
    #[cfg(test)]
    pub(crate) faults: Option<std::sync::Arc<crate::faults::Faults>>,
}

impl RedbOptions {
    /// Defaults, with the log in `<data_dir>/sagas.redb`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            retention: Retention::default(),
            prune_interval: Duration::from_secs(60),
            prune_chunk: 512,
            max_batch: 256,
            linger: Duration::from_micros(300),
            defer_queued: Duration::from_millis(100),
            cache_size: DEFAULT_CACHE_SIZE,
            checkpoint_interval: Duration::from_millis(100),
            wal_size: 16 << 20,
            salvage_wal: false,
            #[cfg(test)]
            faults: None,
        }
    }

    /// How long ended sagas are kept (default: 7 days, at most 100 000).
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// How often ended sagas past the retention are pruned (default 60 s; `Duration::MAX` never).
    pub fn prune_interval(mut self, interval: Duration) -> Self {
        self.prune_interval = interval;
        self
    }

    /// At most this many sagas are deleted per prune transaction (default 512), so pruning never
    /// holds the writer for long.
    pub fn prune_chunk(mut self, sagas: usize) -> Self {
        self.prune_chunk = sagas.max(1);
        self
    }

    /// At most this many writes share one commit (default 256).
    pub fn max_batch(mut self, requests: usize) -> Self {
        self.max_batch = requests.max(1);
        self
    }

    /// How long the writer waits for more writes when fewer are queued than shared the last
    /// commit (default 300 µs; zero never waits). Under load the callers just answered are about
    /// to write again; waiting for them fills the next commit at a fraction of an fsync's cost.
    /// A lone caller never waits. Capped at one second.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger.min(Duration::from_secs(1));
        self
    }

    /// How long a saga's record may wait to be stored when only queued appends changed it
    /// (default 100 ms; zero stores it with the batch that takes them). Its next awaited write
    /// stores it at once; until then readers see the saga's progress this much late, and a
    /// crash loses those appends, as it may any queued append.
    pub fn defer_queued(mut self, delay: Duration) -> Self {
        self.defer_queued = delay.min(Duration::from_secs(10));
        self
    }

    /// At most this many bytes of the database file's pages are kept in memory (default
    /// [`DEFAULT_CACHE_SIZE`], 32 MiB). The sagas being written are served from the log's own
    /// memory, so the cache serves reads of older sagas (listings, lookups of ended ones,
    /// recovery) and the pages a checkpoint rewrites; redb's own default, 1 GiB, lets it grow
    /// to hundreds of megabytes under a steady load for no gain in throughput.
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = bytes;
        self
    }

    /// How often the batches made durable by the write-ahead file are applied to the database
    /// file in one durable redb commit, a checkpoint, on a thread of its own (default 100 ms).
    /// Replaying after a crash redoes at most about twice this much; the batches waiting for a
    /// checkpoint are held in memory.
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// Size of the write-ahead file, allocated when it is created (default 16 MiB, at least
    /// 64 KiB). Each epoch between two checkpoints has half of it, and a checkpoint starts as
    /// soon as half of that is used; a batch that finds no room waits for a checkpoint.
    pub fn wal_size(mut self, bytes: u64) -> Self {
        self.wal_size = bytes.max(64 << 10);
        self
    }

    /// Whether opening replays the intact entries of a damaged write-ahead file (default no:
    /// the open fails with [`Error::WalDamaged`](crate::Error::WalDamaged), naming the file and
    /// where the damage starts, and changes nothing).
    ///
    /// Salvaging replays every entry that passes its checksum, before and after the damage, and
    /// rebuilds the indexes of the sagas they store from their records; what the damaged bytes
    /// held is lost (a saga may come back at an earlier state, or not at all if it began there),
    /// and each damaged stretch is logged. Once opened, the entries are in the database file,
    /// and later opens need no salvage. Copy the write-ahead file aside first.
    pub fn salvage_wal(mut self, salvage: bool) -> Self {
        self.salvage_wal = salvage;
        self
    }

    /// The most bytes of the database file's pages kept in memory ([`cache_size`](Self::cache_size)).
    pub fn cache_bytes(&self) -> usize {
        self.cache_size
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The database file.
    pub fn path(&self) -> PathBuf {
        self.data_dir.join(FILE_NAME)
    }

    /// The write-ahead file beside it.
    pub fn wal_path(&self) -> PathBuf {
        self.data_dir.join(crate::wal::WAL_FILE_NAME)
    }
}
