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
//! Opening the log replays, in order, the entries of the stored epoch and then of the next, each
//! up to the first that is torn (length or checksum wrong) or of another epoch: those are the
//! batches answered since the last checkpoint. The file is filled with zeros when created, so an
//! `fdatasync` only ever flushes data blocks already allocated, never file-system metadata.
//!
//! An entry is `epoch: u64 | length: u32 | crc32(salt, epoch, length, payload): u32 | payload`,
//! all little-endian; its payload is a sequence of [`Op`]s, the table changes of one batch. The
//! salt is drawn when the database file is made and kept in it, so entries written for another
//! database file never pass the checksum.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Name of the write-ahead file inside the data directory.
pub const WAL_FILE_NAME: &str = "sagas.wal";

const HEADER: usize = 16;
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
}

impl Wal {
    /// Opens the file, creating it filled with zeros, `size` bytes, if it is missing or empty
    /// (then there is nothing in it to replay: it only ever holds entries after a checkpoint
    /// that its creation preceded). An existing file keeps its size, which places its halves,
    /// until [`resize`](Self::resize) after the replay.
    pub(crate) fn open(path: PathBuf, size: u64, salt: u64, epoch: u64) -> Result<Self> {
        let io = |source| Error::Wal { path: path.clone(), source };
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let size = if len > 0 {
            len
        } else {
            zero_fill(&file, 0, size).map_err(io)?;
            size
        };
        Ok(Self { file, path, half: size / 2, offset: 0, salt, epoch })
    }

    /// Gives the file `size` bytes, once nothing in it is to be replayed any more (the entries
    /// of other epochs left in it never are, wherever the halves now fall).
    pub(crate) fn resize(&mut self, size: u64) -> Result<()> {
        let io = |source| Error::Wal { path: self.path.clone(), source };
        let len = self.file.metadata().map_err(io)?.len();
        if size > len {
            zero_fill(&self.file, len, size).map_err(io)?;
        } else if size < len {
            self.file.set_len(size).map_err(io)?;
            self.file.sync_all().map_err(io)?;
        }
        self.half = size / 2;
        self.offset = 0;
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Where the half of `epoch` starts.
    fn base(&self, epoch: u64) -> u64 {
        (epoch % 2) * self.half
    }

    /// The payloads of the entries written in `epoch`, in order, up to the first torn one or
    /// one of another epoch.
    pub(crate) fn entries(&self, epoch: u64) -> Result<Vec<Vec<u8>>> {
        let io = |source| Error::Wal { path: self.path.clone(), source };
        let base = self.base(epoch);
        let mut out = Vec::new();
        let mut offset = 0u64;
        let mut header = [0u8; HEADER];
        while offset + HEADER as u64 <= self.half {
            self.file.read_exact_at(&mut header, base + offset).map_err(io)?;
            let (entry_epoch, len, crc) = parse_header(&header);
            let end = offset + HEADER as u64 + u64::from(len);
            if entry_epoch != epoch || len == 0 || end > self.half {
                break;
            }
            let mut payload = vec![0u8; len as usize];
            self.file.read_exact_at(&mut payload, base + offset + HEADER as u64).map_err(io)?;
            if checksum(self.salt, entry_epoch, len, &payload) != crc {
                break;
            }
            out.push(payload);
            offset = end;
        }
        Ok(out)
    }

    /// Appends one entry and waits until it is on disk. `Ok(false)`: it does not fit in what is
    /// left of the epoch's half, and nothing was written (the caller checkpoints instead).
    pub(crate) fn append(&mut self, payload: &[u8]) -> Result<bool> {
        let Ok(len) = u32::try_from(payload.len()) else { return Ok(false) };
        if self.offset + HEADER as u64 + payload.len() as u64 > self.half {
            return Ok(false);
        }
        let mut entry = Vec::with_capacity(HEADER + payload.len());
        entry.extend_from_slice(&self.epoch.to_le_bytes());
        entry.extend_from_slice(&len.to_le_bytes());
        entry.extend_from_slice(&checksum(self.salt, self.epoch, len, payload).to_le_bytes());
        entry.extend_from_slice(payload);
        let io = |source| Error::Wal { path: self.path.clone(), source };
        let started = Instant::now();
        self.file.write_all_at(&entry, self.base(self.epoch) + self.offset).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        let took = started.elapsed();
        if took >= SLOW_SYNC {
            // Every caller in the batch waited this long: worth knowing when a tail is the disk's.
            tracing::warn!(took_ms = took.as_millis() as u64, bytes = entry.len(), "slow write-ahead sync");
        }
        self.offset += entry.len() as u64;
        Ok(true)
    }

    /// Starts writing the entries of `epoch`, from the start of its half. The caller makes sure
    /// that the entries there before (of `epoch - 2`) are in a checkpoint.
    pub(crate) fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.offset = 0;
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

fn parse_header(header: &[u8; HEADER]) -> (u64, u32, u32) {
    let mut epoch = [0u8; 8];
    let mut len = [0u8; 4];
    let mut crc = [0u8; 4];
    epoch.copy_from_slice(&header[..8]);
    len.copy_from_slice(&header[8..12]);
    crc.copy_from_slice(&header[12..]);
    (u64::from_le_bytes(epoch), u32::from_le_bytes(len), u32::from_le_bytes(crc))
}

/// A salt for a new database file: the clock's nanoseconds mixed with the process id.
pub(crate) fn new_salt() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32) ^ 0x5A6A_F10E_u64
}

fn checksum(salt: u64, epoch: u64, len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&salt.to_le_bytes());
    hasher.update(&epoch.to_le_bytes());
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
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

/// One table change, as logged and replayed. Each variant is what [`crate::store::Tables`] does
/// to its indexes at one transition, so replaying a batch's ops repeats its writes exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// A saga began: its request id, number and start time indexed.
    Begun { request_id: String, seq: u64, created_ms: u64 },
    /// A saga ended at `ended_ms`: out of the running ones, into retention's index.
    Ended { seq: u64, ended_ms: u64 },
    /// An ended saga runs again (a stuck saga retried).
    Revived { seq: u64 },
    /// A saga's record, encoded.
    Stored { seq: u64, record: Vec<u8> },
}

impl Op {
    const BEGUN: u8 = 1;
    const ENDED: u8 = 2;
    const REVIVED: u8 = 3;
    const STORED: u8 = 4;

    /// Appends the op's encoding to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Begun { request_id, seq, created_ms } => {
                out.push(Self::BEGUN);
                put_bytes(out, request_id.as_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&created_ms.to_le_bytes());
            }
            Op::Ended { seq, ended_ms } => {
                out.push(Self::ENDED);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&ended_ms.to_le_bytes());
            }
            Op::Revived { seq } => {
                out.push(Self::REVIVED);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Op::Stored { seq, record } => {
                out.push(Self::STORED);
                out.extend_from_slice(&seq.to_le_bytes());
                put_bytes(out, record);
            }
        }
    }

    /// The ops of one entry's payload.
    pub(crate) fn decode_all(mut payload: &[u8]) -> Result<Vec<Op>> {
        let mut ops = Vec::new();
        while let Some((&tag, rest)) = payload.split_first() {
            payload = rest;
            let op = match tag {
                Self::BEGUN => {
                    let request_id = String::from_utf8(take_bytes(&mut payload)?.to_vec())
                        .map_err(|_| corrupt("request id not UTF-8"))?;
                    Op::Begun { request_id, seq: take_u64(&mut payload)?, created_ms: take_u64(&mut payload)? }
                }
                Self::ENDED => Op::Ended { seq: take_u64(&mut payload)?, ended_ms: take_u64(&mut payload)? },
                Self::REVIVED => Op::Revived { seq: take_u64(&mut payload)? },
                Self::STORED => {
                    let seq = take_u64(&mut payload)?;
                    Op::Stored { seq, record: take_bytes(&mut payload)?.to_vec() }
                }
                other => return Err(corrupt(&format!("unknown op {other}"))),
            };
            ops.push(op);
        }
        Ok(ops)
    }
}

fn corrupt(why: &str) -> Error {
    Error::Corrupt(format!("write-ahead entry: {why}"))
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Records and request ids are far below 4 GiB; a longer one would be cut by its own length.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take<'a>(payload: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if payload.len() < n {
        return Err(corrupt("cut short"));
    }
    let (head, rest) = payload.split_at(n);
    *payload = rest;
    Ok(head)
}

fn take_u64(payload: &mut &[u8]) -> Result<u64> {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(take(payload, 8)?);
    Ok(u64::from_le_bytes(bytes))
}

fn take_bytes<'a>(payload: &mut &'a [u8]) -> Result<&'a [u8]> {
    let mut len = [0u8; 4];
    len.copy_from_slice(take(payload, 4)?);
    take(payload, u32::from_le_bytes(len) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<Op> {
        vec![
            Op::Begun { request_id: "req-é".into(), seq: 7, created_ms: 1_700_000_000_000 },
            Op::Stored { seq: 7, record: b"{\"a\":1}".to_vec() },
            Op::Ended { seq: 7, ended_ms: 1_700_000_000_050 },
            Op::Revived { seq: 7 },
        ]
    }

    #[test]
    fn ops_round_trip() {
        let mut payload = Vec::new();
        ops().iter().for_each(|op| op.encode(&mut payload));
        assert_eq!(Op::decode_all(&payload).unwrap(), ops());
        // Cut anywhere inside, it is refused, not misread.
        for cut in 1..payload.len() {
            let decoded = Op::decode_all(&payload[..cut]);
            assert!(decoded.is_err() || decoded.unwrap().len() < ops().len(), "cut at {cut}");
        }
    }

    #[test]
    fn replays_the_current_epoch_up_to_a_torn_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE_NAME);
        let mut wal = Wal::open(path.clone(), 4096, 9, 3).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        assert!(wal.append(b"one").unwrap());
        assert!(wal.append(b"two").unwrap());
        let third = wal.used();
        assert!(wal.append(b"three").unwrap());
        assert_eq!(wal.entries(3).unwrap(), vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
        // Another epoch's entries are not this one's.
        assert!(wal.entries(4).unwrap().is_empty());

        // A torn third entry: the first two still count.
        wal.file.write_all_at(b"X", wal.base(3) + third + HEADER as u64 + 1).unwrap();
        assert_eq!(wal.entries(3).unwrap(), vec![b"one".to_vec(), b"two".to_vec()]);

        // The next epoch writes in the other half: both are there to replay.
        wal.restart(4);
        assert!(wal.append(b"four").unwrap());
        assert_eq!(wal.entries(4).unwrap(), vec![b"four".to_vec()]);
        assert_eq!(wal.entries(3).unwrap(), vec![b"one".to_vec(), b"two".to_vec()]);
        // The one after overwrites the first half from its start, and the old entries left
        // beyond are not replayed.
        wal.restart(5);
        assert!(wal.append(b"five").unwrap());
        assert_eq!(wal.entries(5).unwrap(), vec![b"five".to_vec()]);
        assert!(wal.entries(3).unwrap().is_empty());
        drop(wal);
        let reopened = Wal::open(path.clone(), 1024, 9, 4).unwrap();
        assert_eq!(reopened.room(), 2048, "an existing larger file is kept as it is");
        assert_eq!(reopened.entries(4).unwrap(), vec![b"four".to_vec()]);
        assert_eq!(reopened.entries(5).unwrap(), vec![b"five".to_vec()]);
        drop(reopened);
        // Beside another database file (another salt), nothing in it is replayed.
        let other = Wal::open(path, 4096, 10, 4).unwrap();
        assert!(other.entries(4).unwrap().is_empty());
    }

    #[test]
    fn an_entry_that_does_not_fit_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path().join(WAL_FILE_NAME), 128, 1, 0).unwrap();
        assert!(wal.append(&[1u8; 40]).unwrap());
        assert!(!wal.append(&[2u8; 40]).unwrap(), "an epoch has half the file");
        assert_eq!(wal.used(), 56);
        assert_eq!(wal.entries(0).unwrap(), vec![vec![1u8; 40]]);
        // The next epoch has the other half, whatever the first left.
        wal.restart(1);
        assert!(wal.append(&[2u8; 40]).unwrap());
        assert_eq!(wal.entries(0).unwrap(), vec![vec![1u8; 40]]);
    }
}
