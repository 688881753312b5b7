//! The write-ahead file in front of redb.
//!
//! A redb transaction costs tens of microseconds of CPU besides its fsync (every B-tree page it
//! touches is copied, the page allocator and freed-page lists are rewritten), and under load the
//! writer makes several hundred batches a second. So a batch is not applied to redb at all: its
//! changes are appended here as one entry with one `pwrite` and one `fdatasync`, and kept in
//! memory (the records in an overlay that lookups read before the file). Every 100 ms, or when
//! half of the current epoch's room is used, the entries written so far are applied to redb in
//! one durable transaction, a *checkpoint*, which also raises the epoch stored in the `meta`
//! table: every entry of the epochs before it is retired without touching this file.
//!
//! The file has two halves, and epoch `e` writes in half `e % 2`: a checkpoint runs on a thread
//! of its own while the writer goes on in the next epoch, in the other half, so callers never
//! wait for one. The writer starts an epoch only once the checkpoint before the last one is in
//! the file, so at most two epochs are ever live: the stored one (its checkpoint may have been
//! running when the process died) and the next.
//!
//! Opening the log replays, in order, the entries of the stored epoch and then of the next:
//! those are the batches answered since the last checkpoint. Each epoch's entries run from the
//! start of its half to the first place that holds no entry of that epoch ([`scan`] tells a
//! write cut short by a crash, which ends the entries, from damage that has entries after it,
//! which refuses the open unless salvaging). The file is filled with zeros when created, so an
//! `fdatasync` only ever flushes data blocks already allocated, never file-system metadata. Its
//! size is kept in the database file too, so that a file cut short is seen as such.
//!
//! An entry is `epoch: u64 | length: u32 | crc32(salt, epoch, length, payload): u32 | payload`,
//! all little-endian; its payload is a sequence of [`Op`]s, the table changes of one batch. The
//! salt is drawn when the database file is made and kept in it, so entries written for another
//! database file never pass the checksum. The first entry of an epoch starts with an
//! [`Op::Sealed`] saying where the entries of the epoch before end, so that entries missing at
//! the end of the stored epoch are seen as damage.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

mod op;
pub(crate) mod scan;

pub(crate) use op::Op;
pub(crate) use scan::Scan;

/// Name of the write-ahead file inside the data directory.
pub const WAL_FILE_NAME: &str = "sagas.wal";

/// Bytes of an entry before its payload.
pub(crate) const HEADER: usize = 16;
/// Bytes of an [`Op::Sealed`].
const SEAL: usize = 9;
/// The most room a buffer kept between batches (here, an entry's; the writer's too) holds on
/// to: one batch of unusually large records does not pin its size for the life of the process.
pub(crate) const KEPT_ROOM: usize = 1 << 20;
/// A write-ahead append (write and `fdatasync`) slower than this is logged.
const SLOW_SYNC: Duration = Duration::from_millis(50);

/// The write-ahead file, open for appending entries of one epoch.
#[derive(Debug)]
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// The size of one half: the room of one epoch.
    half: u64,
    /// Where the next entry goes, from the start of the current epoch's half.
    offset: u64,
    salt: u64,
    /// The epoch of the entries being written: the one stored by the last checkpoint.
    epoch: u64,
    /// Created by [`open`](Self::open): nothing in it to replay.
    created: bool,
    /// An append failed here (epoch, offset in its half): whatever it left there is not an
    /// entry, and nothing after it was written.
    refused: Option<(u64, u64)>,
    /// Where the entries of the previous epoch end, until the first entry of this one, which
    /// records it ([`Op::Sealed`]), is written.
    seal: Option<u64>,
    /// The entry being written, kept between appends for its room.
    entry: Vec<u8>,
    /// Failures to inject, in tests.
    #[cfg(test)]
    pub(crate) faults: Option<std::sync::Arc<crate::faults::Faults>>,
}

impl Wal {
    /// Opens the file, creating it filled with zeros, `size` bytes, if it is missing or empty
    /// (then there is nothing in it to replay: it only ever holds entries after a checkpoint
    /// that its creation preceded). An existing file is read in the halves of `written`, the
    /// size its entries were written with, else of its own length, until [`resize`](Self::resize)
    /// after the replay.
    pub(crate) fn open(path: PathBuf, size: u64, salt: u64, epoch: u64, written: Option<u64>) -> Result<Self> {
        let io = |source| Error::Wal { path: path.clone(), source };
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let created = len == 0;
        let size = if created {
            zero_fill(&file, 0, size).map_err(io)?;
            size
        } else {
            written.unwrap_or(len)
        };
        Ok(Self {
            file,
            path,
            half: size / 2,
            offset: 0,
            salt,
            epoch,
            created,
            refused: None,
            seal: None,
            entry: Vec::new(),
            #[cfg(test)]
            faults: None,
        })
    }

    /// Notes that an append of this process failed at `refused` (epoch, offset in its half):
    /// what it may have left there is not read as an entry.
    pub(crate) fn refused_at(mut self, refused: Option<(u64, u64)>) -> Self {
        self.refused = refused;
        self
    }

    /// Where an append of this process failed, if one did in an epoch still to be replayed.
    pub(crate) fn refused(&self) -> Option<(u64, u64)> {
        self.refused
    }

    /// After a failed append: zeros where its entry starts, so that whatever it left of it is
    /// not replayed after a crash either. Best effort: the disk that failed the append may fail
    /// this too (then the entry, if whole, is replayed after a crash, as a write whose answer
    /// was lost would be).
    pub(crate) fn scrub_refused(&self) {
        let Some((epoch, at)) = self.refused.filter(|&(epoch, _)| epoch == self.epoch) else { return };
        let scrubbed = self.file.write_all_at(&[0; HEADER], self.base(epoch) + at).and_then(|()| self.file.sync_data());
        if let Err(e) = scrubbed {
            tracing::warn!(path = %self.path.display(), error = %e, "could not clear a failed write-ahead entry");
        }
    }

    /// Gives the file at least `size` bytes, leaving what it holds where it is, so that its
    /// entries can still be read in the halves they were written in. Done before the checkpoint
    /// that records `size` as the file's size, so the file is never shorter than recorded.
    pub(crate) fn grow(&mut self, size: u64) -> Result<()> {
        let io = |source| Error::Wal { path: self.path.clone(), source };
        let len = self.file.metadata().map_err(io)?.len();
        if size > len {
            zero_fill(&self.file, len, size).map_err(io)?;
        }
        Ok(())
    }

    /// Makes the file `size` bytes, in halves of half that, once nothing in it is to be
    /// replayed any more (the entries of other epochs left in it never are, wherever the halves
    /// now fall) and `size` is recorded as its size.
    pub(crate) fn resize(&mut self, size: u64) -> Result<()> {
        self.grow(size)?;
        let io = |source| Error::Wal { path: self.path.clone(), source };
        let len = self.file.metadata().map_err(io)?.len();
        if size < len {
            self.file.set_len(size).map_err(io)?;
            self.file.sync_all().map_err(io)?;
        }
        self.half = size / 2;
        self.offset = 0;
        self.created = false;
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Where the half of `epoch` starts.
    fn base(&self, epoch: u64) -> u64 {
        (epoch % 2) * self.half
    }

    /// What the half of `epoch` holds: its intact entries, and how they end.
    pub(crate) fn read(&self, epoch: u64) -> Result<Scan> {
        if self.created {
            return Ok(Scan::default());
        }
        let io = |source| Error::Wal { path: self.path.clone(), source };
        let base = self.base(epoch);
        let len = self.file.metadata().map_err(io)?.len();
        // What the file holds of the half; past its end, zeros.
        let mut end = self.half.min(len.saturating_sub(base));
        if let Some((refused_epoch, at)) = self.refused
            && refused_epoch == epoch
        {
            end = end.min(at);
        }
        let mut half = vec![0u8; self.half as usize];
        self.file.read_exact_at(&mut half[..end as usize], base).map_err(io)?;
        Ok(scan::scan(&half, len, epoch, self.salt, base))
    }

    /// The entries of the stored `epoch` and of the next, as [`read`](Self::read) finds them;
    /// the next epoch's first entry says where the stored epoch's entries end, so entries
    /// missing at the end of the stored epoch are damage, not a write cut short.
    pub(crate) fn replay(&self, epoch: u64) -> Result<[Scan; 2]> {
        let (mut stored, next) = (self.read(epoch)?, self.read(epoch + 1)?);
        let sealed = next.entries.first().and_then(|first| Op::sealed(first));
        let base = self.base(epoch);
        match sealed {
            Some(end) if stored.damage.is_empty() && stored.intact_end != base + end => {
                stored.torn = None;
                stored.damage.push(scan::Damage::Missing { at: stored.intact_end, end: base + end });
            }
            // What ends the stored epoch's entries is past their end: junk, not a write.
            Some(_) => stored.torn = None,
            // Written without seals: a write cut short is the last one only if nothing follows.
            None => {
                if let Some(at) = stored.torn.filter(|_| !next.entries.is_empty()) {
                    stored.torn = None;
                    stored.damage.push(scan::Damage::BeforeNextEpoch { at });
                }
            }
        }
        Ok([stored, next])
    }

    /// Appends one entry and waits until it is on disk. `Ok(false)`: it does not fit in what is
    /// left of the epoch's half, and nothing was written (the caller checkpoints instead). On
    /// an error, what the append left in the file is never read as an entry by this process.
    pub(crate) fn append(&mut self, payload: &[u8]) -> Result<bool> {
        let mut entry = std::mem::take(&mut self.entry);
        entry.clear();
        let appended = self.append_in(&mut entry, payload);
        // Kept for the next entry, unless an unusually large one grew it.
        entry.shrink_to(KEPT_ROOM);
        self.entry = entry;
        appended
    }

    /// [`append`](Self::append), building the entry in `entry` (empty).
    fn append_in(&mut self, entry: &mut Vec<u8>, payload: &[u8]) -> Result<bool> {
        entry.reserve(HEADER + SEAL + payload.len());
        entry.extend_from_slice(&[0; HEADER]);
        if let Some(previous_end) = self.seal {
            Op::Sealed { previous_end }.encode(entry);
        }
        entry.extend_from_slice(payload);
        let Ok(len) = u32::try_from(entry.len() - HEADER) else { return Ok(false) };
        if self.offset + entry.len() as u64 > self.half {
            return Ok(false);
        }
        let crc = scan::checksum(self.salt, self.epoch, len, &entry[HEADER..]);
        entry[..8].copy_from_slice(&self.epoch.to_le_bytes());
        entry[8..12].copy_from_slice(&len.to_le_bytes());
        entry[12..HEADER].copy_from_slice(&crc.to_le_bytes());
        let io = |source| Error::Wal { path: self.path.clone(), source };
        let started = Instant::now();
        let written = self
            .file
            .write_all_at(entry, self.base(self.epoch) + self.offset)
            .and_then(|()| self.injected_fault())
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            self.refused = Some((self.epoch, self.offset));
            return Err(io(e));
        }
        let took = started.elapsed();
        if took >= SLOW_SYNC {
            // Every caller in the batch waited this long: worth knowing when a tail is the disk's.
            tracing::warn!(took_ms = took.as_millis() as u64, bytes = entry.len(), "slow write-ahead sync");
        }
        self.offset += entry.len() as u64;
        self.seal = None;
        Ok(true)
    }

    /// Starts writing the entries of `epoch`, from the start of its half. The caller makes sure
    /// that the entries there before (of `epoch - 2`) are in a checkpoint.
    pub(crate) fn restart(&mut self, epoch: u64) {
        // Only the epoch right after the stored one is replayed with the one before it.
        self.seal = (epoch == self.epoch + 1).then_some(self.offset);
        self.epoch = epoch;
        self.offset = 0;
        if self.refused.is_some_and(|(refused, _)| refused < epoch) {
            self.refused = None;
        }
    }

    /// The epoch of the entries being written.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes written in the current epoch.
    pub(crate) fn used(&self) -> u64 {
        self.offset
    }

    /// The room of one epoch: half the file.
    pub(crate) fn room(&self) -> u64 {
        self.half
    }
}

impl Wal {
    /// A failure injected by a test, after the entry is written and before it is synced.
    #[cfg(test)]
    fn injected_fault(&self) -> io::Result<()> {
        match &self.faults {
            Some(faults) if faults.wal.load(std::sync::atomic::Ordering::SeqCst) => Err(crate::faults::no_space()),
            _ => Ok(()),
        }
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn injected_fault(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A salt for a new database file: the clock's nanoseconds mixed with the process id.
pub(crate) fn new_salt() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32) ^ 0x5A6A_F10E_u64
}

fn zero_fill(file: &File, from: u64, to: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK as usize];
    let mut at = from;
    while at < to {
        let n = CHUNK.min(to - at);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests;
