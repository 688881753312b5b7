//! Checkpoints: the batches made durable by the write-ahead file, applied to the database file
//! in one durable redb commit, on a thread of their own.

use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use redb::{Database, Durability};

use super::tables::{Snapshot, Tables, WAL_EPOCH};
use crate::error::{Error, Result};
use crate::wal::Op;

/// A checkpoint slower than this is logged as a warning (every one is, at debug level).
const SLOW_CHECKPOINT: Duration = Duration::from_secs(1);

/// The ops of one epoch's write-ahead entries (or of several, after a failed checkpoint), to
/// apply in a checkpoint that stores `stamp` as the next epoch to replay.
pub(super) struct Job {
    pub(super) ops: Vec<Op>,
    pub(super) stamp: u64,
}

/// What became of a [`Job`], with its ops back either way. The writer allocated them and frees
/// them: blocks freed on another thread cost the allocator more (mimalloc hands them back to the
/// allocating thread's pages, which it must then collect).
pub(super) struct Finished {
    /// The file as of the checkpoint (`None` if it could not be read after the commit), or why
    /// the checkpoint failed.
    pub(super) outcome: Result<Option<Snapshot>>,
    /// The job's ops.
    pub(super) ops: Vec<Op>,
}

/// The thread that makes checkpoints while the writer goes on writing the next epoch.
pub(super) struct Checkpointer {
    /// `None` once stopping.
    pub(super) jobs: Option<mpsc::Sender<Job>>,
    pub(super) done: mpsc::Receiver<Finished>,
    pub(super) thread: Option<thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub(super) fn spawn(db: Arc<Database>) -> Result<Self> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("sagaflow-redb-checkpoint".into())
            .spawn(move || {
                for job in inbox {
                    let started = Instant::now();
                    let outcome = checkpoint_job(&db, &job);
                    let took = started.elapsed();
                    let (took_ms, ops) = (took.as_millis() as u64, job.ops.len());
                    if took >= SLOW_CHECKPOINT {
                        tracing::warn!(took_ms, ops, "slow saga log checkpoint");
                    } else {
                        tracing::debug!(took_ms, ops, "saga log checkpoint");
                    }
                    if outbox.send(Finished { outcome, ops: job.ops }).is_err() {
                        break;
                    }
                }
            })
            .map_err(Error::Spawn)?;
        Ok(Self { jobs: Some(jobs), done, thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("saga log checkpoint thread panicked");
        }
    }
}

/// Applies a job in one durable commit; then reads the file as of it.
fn checkpoint_job(db: &Database, job: &Job) -> Result<Option<Snapshot>> {
    commit_checkpoint(db, &[&job.ops], job.stamp, |_| Ok(()))?;
    Ok(snapshot_after_checkpoint(db))
}

/// A checkpoint's transaction: applies `runs`, then `more` (pruning), and commits durably with
/// `epoch` stored as the first write-ahead epoch to replay, so that the entries of the epochs
/// before it are never replayed.
pub(super) fn commit_checkpoint<T>(
    db: &Database,
    runs: &[&[Op]],
    epoch: u64,
    more: impl FnOnce(&mut Tables<'_>) -> Result<T>,
) -> Result<T> {
    let mut txn = db.begin_write()?;
    let done = {
        let mut tables = Tables::open(&txn)?;
        tables.apply_all(runs)?;
        tables.meta.insert(WAL_EPOCH, epoch)?;
        more(&mut tables)?
    };
    txn.set_durability(Durability::Immediate)
        .map_err(|e| Error::Corrupt(format!("cannot make a durable commit: {e}")))?;
    txn.commit()?;
    Ok(done)
}

/// The file as a checkpoint left it; `None` (logged) if it cannot be read, in which case the
/// caller keeps its overlay, which still covers everything since its snapshot.
pub(super) fn snapshot_after_checkpoint(db: &Database) -> Option<Snapshot> {
    Snapshot::open(db)
        .inspect_err(|e| tracing::warn!(error = %e, "saga log could not read its file after a checkpoint"))
        .ok()
}
