//! Opening the database file: every table created, an old file converted, the write-ahead
//! entries written since the last checkpoint replayed, and a new write-ahead epoch begun.

use redb::{Database, DatabaseError, ReadableTable};

use super::tables::{Tables, WAL_EPOCH, WAL_SALT, WAL_SIZE};
use crate::error::{Error, Result};
use crate::options::RedbOptions;
use crate::wal::{Op, Wal};

/// The database file, open and up to date with the write-ahead file.
pub(super) struct Opened {
    pub(super) db: Database,
    /// Open for appending the entries of the new epoch.
    pub(super) wal: Wal,
    /// The sequence number of the next saga to begin.
    pub(super) next_seq: u64,
}

/// Opens (creating it if needed) the database file of `options`, replays the write-ahead file
/// into it and starts a new epoch. `refused`: where an append of this process failed (epoch,
/// offset in its half), so that what it left is not replayed.
pub(super) fn open(options: &RedbOptions, refused: Option<(u64, u64)>) -> Result<Opened> {
    let path = options.path();
    let db = create(options).map_err(|e| match e {
        DatabaseError::DatabaseAlreadyOpen => Error::AlreadyOpen { path: path.clone() },
        source => Error::Open { path: path.clone(), source },
    })?;
    // Create every table up front so readers never meet a missing one; replay what the
    // write-ahead file holds beyond the last checkpoint, and start a new epoch.
    let txn = db.begin_write()?;
    let (next_seq, wal, epoch) = {
        let mut tables = Tables::open(&txn)?;
        crate::migrate::from_request_id_keys(&txn, &mut tables)?;
        let epoch = tables.meta.get(WAL_EPOCH)?.map_or(0, |epoch| epoch.value());
        let salt = tables.meta.get(WAL_SALT)?.map(|salt| salt.value());
        let salt = match salt {
            Some(salt) => salt,
            None => {
                let salt = crate::wal::new_salt();
                tables.meta.insert(WAL_SALT, salt)?;
                salt
            }
        };
        let written = tables.meta.get(WAL_SIZE)?.map(|size| size.value());
        let mut wal = Wal::open(options.wal_path(), options.wal_size, salt, epoch, written)?.refused_at(refused);
        #[cfg(test)]
        {
            wal.faults = options.faults.clone();
        }
        let ops = read_entries(&wal, epoch, options.salvage_wal)?;
        // The file must be as large as recorded before it is recorded.
        wal.grow(options.wal_size)?;
        tables.apply_all(&[&ops.ops])?;
        if ops.salvaged {
            let sagas = tables.reindex(&ops.ops)?;
            tracing::warn!(path = %wal.path().display(), sagas, "saga log salvaged the intact entries of its damaged write-ahead file");
        }
        if ops.batches > 0 {
            tracing::info!(path = %wal.path().display(), batches = ops.batches, "saga log replayed its write-ahead file");
        }
        tables.meta.insert(WAL_EPOCH, epoch + 2)?;
        tables.meta.insert(WAL_SIZE, options.wal_size)?;
        (tables.sagas.last()?.map_or(0, |(seq, _)| seq.value() + 1), wal, epoch + 2)
    };
    txn.commit()?;
    let mut wal = wal;
    wal.resize(options.wal_size)?;
    wal.restart(epoch);
    Ok(Opened { db, wal, next_seq })
}

/// Opens (creating it if needed) the database file.
fn create(options: &RedbOptions) -> std::result::Result<Database, DatabaseError> {
    let mut builder = Database::builder();
    builder.set_cache_size(options.cache_size);
    #[cfg(test)]
    if let Some(faults) = &options.faults {
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(options.path())?;
        return builder.create_with_backend(crate::faults::FaultyBackend::new(file, faults.clone()));
    }
    builder.create(options.path())
}

/// The ops of the write-ahead entries to replay.
struct Replay {
    ops: Vec<Op>,
    /// Entries replayed.
    batches: usize,
    /// Whether entries after damage are among them.
    salvaged: bool,
}

/// The ops of the entries of the stored `epoch`, whose checkpoint may have been under way, and
/// of the next, in order. Damage refuses the open unless `salvage`.
fn read_entries(wal: &Wal, epoch: u64, salvage: bool) -> Result<Replay> {
    let mut out = Replay { ops: Vec::new(), batches: 0, salvaged: false };
    for scan in wal.replay(epoch)? {
        if let Some(first) = scan.damage.first() {
            if !salvage {
                let (path, offset, detail) = (wal.path().to_path_buf(), first.offset(), first.to_string());
                return Err(Error::WalDamaged { path, offset, detail });
            }
            for damage in &scan.damage {
                tracing::warn!(path = %wal.path().display(), offset = damage.offset(), "{damage}; salvaging what is intact");
            }
            out.salvaged = true;
        }
        if let Some(offset) = scan.torn {
            tracing::warn!(
                path = %wal.path().display(),
                offset,
                "write-ahead entry cut short by a crash: its batch was never answered, and is dropped"
            );
        }
        for payload in &scan.entries {
            match Op::decode_all(payload) {
                Ok(ops) => out.ops.extend(ops.into_iter().filter(|op| !matches!(op, Op::Sealed { .. }))),
                Err(e) if salvage => {
                    tracing::warn!(path = %wal.path().display(), error = %e, "write-ahead entry unreadable; skipped")
                }
                Err(e) => return Err(e),
            }
            out.batches += 1;
        }
    }
    Ok(out)
}
