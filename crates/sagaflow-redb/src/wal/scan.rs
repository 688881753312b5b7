//! Reading one epoch's half of the write-ahead file, and telling how its entries end.
//!
//! An epoch's entries are written one after the other from the start of its half, each made
//! durable before the next is written. So the first place that does not hold an entry of the
//! epoch ends them, unless an intact entry of the epoch comes later in the half: then something
//! changed the file after it was written (a bad disk block, a stray write), and the entries
//! after the damage were answered as surely as those before it. The half is searched for such
//! entries byte by byte, each candidate checked by its checksum, which covers the epoch, the
//! length and the salt of the database file, so entries of older epochs left beyond the end, or
//! of another database file, never count.
//!
//! How the entries end:
//! - at zeros or at an entry of another epoch: the end, nothing to say;
//! - at what starts like an entry of the epoch but fails its checksum, with nothing intact
//!   after it: the last write, cut short by a crash ([`Scan::torn`]), cut with a warning;
//! - at anything, with intact entries of the epoch after it: damage ([`Damage::Garbled`]);
//! - at the end of the file before the end of the half could tell: the file was cut
//!   ([`Damage::Cut`]), since the file is made at its full size and never shortened while it
//!   holds entries to replay.

use std::ops::Range;

use super::HEADER;

/// What one epoch's half holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Scan {
    /// The payloads of the intact entries, in order: those before any damage, then those found
    /// after it.
    pub(crate) entries: Vec<Vec<u8>>,
    /// How many of `entries` come before the first damage (all of them if there is none).
    pub(crate) before_damage: usize,
    /// Where those end, in the file.
    pub(crate) intact_end: u64,
    /// Where the file was found damaged, in order.
    pub(crate) damage: Vec<Damage>,
    /// Where a last entry cut short by a crash starts, in the file.
    pub(crate) torn: Option<u64>,
}

/// Damage found in a half; offsets are in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Damage {
    /// These bytes hold no intact entry, and intact entries of the epoch follow them.
    Garbled(Range<u64>),
    /// The file ends at `len`, where the entries of the epoch may go on.
    Cut {
        /// The file's length.
        len: u64,
    },
    /// The entry at `at` fails its checksum, as a write cut short by a crash would, but the
    /// next epoch has entries, written after it.
    BeforeNextEpoch {
        /// Where the entry starts.
        at: u64,
    },
    /// The entries end at `at`, where the next epoch's first entry says they end at `end`.
    Missing {
        /// Where the intact entries end.
        at: u64,
        /// Where they were written up to.
        end: u64,
    },
}

impl Damage {
    /// Where in the file the damage starts.
    pub(crate) fn offset(&self) -> u64 {
        match self {
            Damage::Garbled(bytes) => bytes.start,
            Damage::Cut { len } => *len,
            Damage::BeforeNextEpoch { at } => *at,
            Damage::Missing { at, .. } => *at,
        }
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Garbled(bytes) => write!(
                f,
                "bytes {}..{} hold no intact entry, and intact entries written after them follow",
                bytes.start, bytes.end
            ),
            Damage::Cut { len } => write!(f, "the file ends at byte {len}, inside the entries still to replay"),
            Damage::BeforeNextEpoch { at } => write!(
                f,
                "the entry at byte {at} fails its checksum, and entries of the next epoch, written after it, follow"
            ),
            Damage::Missing { at, end } => write!(
                f,
                "the entries end at byte {at}, but were written up to byte {end} (as the next epoch's first entry records)"
            ),
        }
    }
}

/// Reads the entries of `epoch` in `half`, the bytes of its half (zeros past the end of the
/// file, which is `file_len` bytes long); `base` is where the half starts in the file.
pub(crate) fn scan(half: &[u8], file_len: u64, epoch: u64, salt: u64, base: u64) -> Scan {
    let in_file = file_len.saturating_sub(base).min(half.len() as u64) as usize;
    let mut out = Scan::default();
    let mut at = 0;
    loop {
        while let Some(end) = entry_at(half, at, epoch, salt) {
            out.entries.push(half[at + HEADER..end].to_vec());
            at = end;
        }
        if out.damage.is_empty() {
            out.before_damage = out.entries.len();
            out.intact_end = base + at as u64;
        }
        // Where the entries stop, the file must say so: a header it does not hold, or one of
        // this epoch whose payload it does not hold, may be the file's end cutting them off.
        let started = starts_like_entry(half, at, epoch);
        let header_cut = at + HEADER > in_file && in_file < half.len();
        let payload_cut = started.is_some_and(|end| end > in_file) && in_file < half.len();
        if header_cut || payload_cut {
            out.damage.push(Damage::Cut { len: file_len });
            return out;
        }
        match next_entry(half, at + 1, epoch, salt) {
            Some(next) => {
                out.damage.push(Damage::Garbled(base + at as u64..base + next as u64));
                at = next;
            }
            None => {
                if started.is_some() {
                    out.torn = Some(base + at as u64);
                }
                return out;
            }
        }
    }
}

/// The end of the intact entry of `epoch` at `at`, if one is there.
fn entry_at(half: &[u8], at: usize, epoch: u64, salt: u64) -> Option<usize> {
    let end = starts_like_entry(half, at, epoch)?;
    let header = half.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[8..12].try_into().ok()?);
    let crc = u32::from_le_bytes(header[12..16].try_into().ok()?);
    let payload = half.get(at + HEADER..end)?;
    (checksum(salt, epoch, len, payload) == crc).then_some(end)
}

/// Where the entry at `at` would end, if its header names `epoch` and a length that fits.
fn starts_like_entry(half: &[u8], at: usize, epoch: u64) -> Option<usize> {
    let header = half.get(at..at.checked_add(HEADER)?)?;
    let entry_epoch = u64::from_le_bytes(header[..8].try_into().ok()?);
    let len = u32::from_le_bytes(header[8..12].try_into().ok()?);
    let end = at + HEADER + len as usize;
    (entry_epoch == epoch && len > 0 && end <= half.len()).then_some(end)
}

/// The first intact entry of `epoch` starting at or after `from`.
fn next_entry(half: &[u8], from: usize, epoch: u64, salt: u64) -> Option<usize> {
    let finder = memchr::memmem::Finder::new(&epoch.to_le_bytes()).into_owned();
    let mut from = from;
    // One match at a time, from the byte after the last: matches of a needle like an epoch's
    // zeros overlap.
    while let Some(found) = finder.find(half.get(from..)?) {
        let at = from + found;
        if entry_at(half, at, epoch, salt).is_some() {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// An entry's checksum: of the database file's salt, its epoch, its length and its payload.
pub(crate) fn checksum(salt: u64, epoch: u64, len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&salt.to_le_bytes());
    hasher.update(&epoch.to_le_bytes());
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}
