//! Opening the database file: every table created, an old file converted, the write-ahead
//! entries written since the last checkpoint replayed, and a new write-ahead epoch begun.

use redb::{Database, DatabaseError, ReadableTable};

use super::tables::{Tables, WAL_EPOCH, WAL_SALT};
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
/// into it and starts a new epoch.
pub(super) fn open(options: &RedbOptions) -> Result<Opened> {
    let path = options.path();
    let db = Database::builder().set_cache_size(options.cache_size).create(&path).map_err(|e| match e {
        DatabaseError::DatabaseAlreadyOpen => Error::AlreadyOpen { path: path.clone() },
        source => Error::Open { path: path.clone(), source },
    })?;
    // Create every table up front so readers never meet a missing one; replay what the
    // write-ahead file holds beyond the last checkpoint, and start a new epoch.
    let txn = db.begin_write()?;
    let (next_seq, wal) = {
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
        let mut wal = Wal::open(options.wal_path(), options.wal_size, salt, epoch)?;
        // The stored epoch, whose checkpoint may have been under way, and the next.
        let mut ops = Vec::new();
        let mut batches = 0;
        for epoch in [epoch, epoch + 1] {
            let entries = wal.entries(epoch)?;
            batches += entries.len();
            for payload in &entries {
                ops.extend(Op::decode_all(payload)?);
            }
        }
        tables.apply_all(&[&ops])?;
        if batches > 0 {
            tracing::info!(path = %wal.path().display(), batches, "saga log replayed its write-ahead file");
        }
        tables.meta.insert(WAL_EPOCH, epoch + 2)?;
        wal.restart(epoch + 2);
        (tables.sagas.last()?.map_or(0, |(seq, _)| seq.value() + 1), wal)
    };
    txn.commit()?;
    let mut wal = wal;
    wal.resize(options.wal_size)?;
    Ok(Opened { db, wal, next_seq })
}
