//! The write-ahead file: appends, epochs, and what reading finds in a damaged file.

use std::collections::BTreeSet;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scan::Damage;
use super::*;

/// The entries of both epochs as `replay` finds them, or the first damage.
fn replayed(wal: &Wal, epoch: u64) -> std::result::Result<Vec<Vec<u8>>, Damage> {
    let [stored, next] = wal.replay(epoch).unwrap();
    if let Some(damage) = stored.damage.first().or(next.damage.first()) {
        return Err(damage.clone());
    }
    Ok(stored.entries.into_iter().chain(next.entries).collect())
}

/// Every intact entry of both epochs, as salvaging replays them.
fn salvaged(wal: &Wal, epoch: u64) -> Vec<Vec<u8>> {
    let [stored, next] = wal.replay(epoch).unwrap();
    stored.entries.into_iter().chain(next.entries).collect()
}

fn flip(path: &Path, at: u64) {
    let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x20], at).unwrap();
}

#[test]
fn replays_the_current_epoch_up_to_an_entry_cut_short() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let mut wal = Wal::open(path.clone(), 4096, 9, 3, None).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
    assert!(wal.read(3).unwrap().entries.is_empty(), "a file just made holds nothing to replay");
    assert!(wal.append(b"one").unwrap());
    assert!(wal.append(b"two").unwrap());
    let third = wal.base(3) + wal.used();
    assert!(wal.append(b"three").unwrap());
    let wal = Wal::open(path.clone(), 4096, 9, 3, Some(4096)).unwrap();
    assert_eq!(replayed(&wal, 3).unwrap(), [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);

    // The last entry cut short, as by a crash: the first two still count, the third is cut.
    flip(&path, third + HEADER as u64 + 1);
    let [stored, next] = wal.replay(3).unwrap();
    assert_eq!(stored.entries, [b"one".to_vec(), b"two".to_vec()]);
    assert_eq!((stored.torn, stored.damage.len()), (Some(third), 0));
    assert!(next.entries.is_empty());

    // Beside another database file (another salt), nothing in it is replayed.
    let other = Wal::open(path, 4096, 10, 3, Some(4096)).unwrap();
    assert_eq!(replayed(&other, 3).unwrap(), Vec::<Vec<u8>>::new());
}

#[test]
fn damage_before_the_end_names_its_offset_and_salvage_reads_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let mut wal = Wal::open(path.clone(), 4096, 9, 3, None).unwrap();
    let second = wal.base(3) + HEADER as u64 + 3;
    for payload in [b"one".as_slice(), b"two", b"three"] {
        assert!(wal.append(payload).unwrap());
    }
    flip(&path, second + HEADER as u64);
    let wal = Wal::open(path, 4096, 9, 3, Some(4096)).unwrap();
    match replayed(&wal, 3) {
        Err(damage @ Damage::Garbled(_)) => {
            assert_eq!(damage.offset(), second);
            assert_eq!(damage, Damage::Garbled(second..second + HEADER as u64 + 3));
        }
        other => panic!("replay: {other:?}"),
    }
    assert_eq!(salvaged(&wal, 3), [b"one".to_vec(), b"three".to_vec()]);
}

#[test]
fn the_next_epoch_records_where_the_stored_one_ended() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let mut wal = Wal::open(path.clone(), 4096, 9, 3, None).unwrap();
    assert!(wal.append(b"one").unwrap());
    let last = wal.base(3) + wal.used();
    assert!(wal.append(b"two").unwrap());
    wal.restart(4);
    assert!(wal.append(b"four").unwrap());
    let wal = Wal::open(path.clone(), 4096, 9, 3, Some(4096)).unwrap();
    let all = replayed(&wal, 3).unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(Op::sealed(&all[2]), Some(2 * (HEADER as u64 + 3)), "the first entry of 4 says where 3 ended");

    // The stored epoch's last entry loses its epoch: without the record of where it ended it
    // would look like the end of the entries.
    flip(&path, last);
    assert_eq!(replayed(&wal, 3), Err(Damage::Missing { at: last, end: last + HEADER as u64 + 3 }));
}

#[test]
fn a_file_cut_short_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let mut wal = Wal::open(path.clone(), 4096, 9, 2, None).unwrap();
    assert!(wal.append(&[7u8; 100]).unwrap());
    OpenOptions::new().write(true).open(&path).unwrap().set_len(60).unwrap();
    let wal = Wal::open(path, 4096, 9, 2, Some(4096)).unwrap();
    assert_eq!(replayed(&wal, 2), Err(Damage::Cut { len: 60 }));
}

#[test]
fn an_entry_that_does_not_fit_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(WAL_FILE_NAME);
    let mut wal = Wal::open(path.clone(), 160, 1, 0, None).unwrap();
    assert!(wal.append(&[1u8; 40]).unwrap());
    assert!(!wal.append(&[2u8; 40]).unwrap(), "an epoch has half the file");
    assert_eq!(wal.used(), 56);
    // The next epoch has the other half, whatever the first left; its first entry also says
    // where the first epoch ended.
    wal.restart(1);
    assert!(!wal.append(&[2u8; 60]).unwrap(), "16 + 9 + 60 bytes do not fit in 80");
    assert!(wal.append(&[2u8; 40]).unwrap());
    assert_eq!(wal.used(), 16 + 9 + 40);
    let wal = Wal::open(path, 160, 1, 0, Some(160)).unwrap();
    assert_eq!(wal.read(0).unwrap().entries, [vec![1u8; 40]]);
}

/// One entry as written: its epoch, its bytes in the file, and its payload.
#[derive(Debug, Clone)]
struct Written {
    bytes: std::ops::Range<u64>,
    payload: Vec<u8>,
}

/// A payload as the writer makes them: a stored record of random bytes.
fn payload(rng: &mut StdRng) -> Vec<u8> {
    let record: Vec<u8> = (0..rng.random_range(1..120)).map(|_| rng.random()).collect();
    let mut out = Vec::new();
    Op::Stored { seq: rng.random(), record }.encode(&mut out);
    out
}

/// Appends up to `n` random entries in the current epoch; returns those written.
fn write(wal: &mut Wal, rng: &mut StdRng, n: usize) -> Vec<Written> {
    let mut out = Vec::new();
    for _ in 0..n {
        let payload = payload(rng);
        let start = wal.base(wal.epoch()) + wal.used();
        let sealed = wal.seal;
        if !wal.append(&payload).unwrap() {
            break;
        }
        let mut written = Vec::new();
        if let Some(previous_end) = sealed {
            Op::Sealed { previous_end }.encode(&mut written);
        }
        written.extend_from_slice(&payload);
        out.push(Written { bytes: start..wal.base(wal.epoch()) + wal.used(), payload: written });
    }
    out
}

/// What the test did to the file.
#[derive(Debug)]
struct Harm {
    flipped: BTreeSet<u64>,
    cut_to: Option<u64>,
}

impl Harm {
    fn touches(&self, entry: &Written) -> bool {
        self.flipped.range(entry.bytes.clone()).next().is_some() || self.cut_to.is_some_and(|len| entry.bytes.end > len)
    }
}

/// Random truncations and byte flips of a write-ahead file, never a panic, never an entry
/// before the damage dropped: replay returns a prefix of what was written that holds every
/// entry before the first damaged one, or refuses; salvage then returns every entry before it
/// too, and nothing that was not written. Set `SAGAFLOW_WAL_CASES` for more cases than 400.
#[test]
fn damage_never_drops_an_entry_before_it() {
    let cases: u64 = std::env::var("SAGAFLOW_WAL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
    let seed: u64 = std::env::var("SAGAFLOW_WAL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5A6A);
    // No fsync costs anything on tmpfs, where there is one.
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let (mut refused, mut cut, mut whole) = (0, 0, 0);
    for case in 0..cases {
        let mut rng = StdRng::seed_from_u64(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let path = dir.path().join(format!("{case}.wal"));
        let size = 2 * rng.random_range(256..2048u64);
        let salt: u64 = rng.random();
        let epoch = rng.random_range(2..1_000_000u64);
        // Older epochs' entries first, left behind where the live epochs do not reach.
        let mut wal = Wal::open(path.clone(), size, salt, epoch - 2, None).unwrap();
        write(&mut wal, &mut rng, 30);
        wal.restart(epoch - 1);
        write(&mut wal, &mut rng, 30);
        wal.restart(epoch);
        let n = rng.random_range(0..12);
        let mut entries = write(&mut wal, &mut rng, n);
        if rng.random_bool(0.6) {
            wal.restart(epoch + 1);
            let n = rng.random_range(0..12);
            entries.extend(write(&mut wal, &mut rng, n));
        }
        drop(wal);

        let mut harm = Harm { flipped: BTreeSet::new(), cut_to: None };
        let kind = rng.random_range(0..4);
        if kind == 0 || kind == 3 {
            harm.cut_to = Some(rng.random_range(0..size));
        }
        if kind >= 1 {
            for _ in 0..rng.random_range(1..=3) {
                // Mostly inside an entry, where it matters.
                let at = match entries.len() {
                    n if n > 0 && kind == 2 => {
                        let e = &entries[rng.random_range(0..n)];
                        rng.random_range(e.bytes.clone())
                    }
                    _ => rng.random_range(0..size),
                };
                harm.flipped.insert(at);
            }
        }
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        for &at in &harm.flipped {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, at).unwrap();
            file.write_all_at(&[byte[0] ^ rng.random_range(1..=255u8)], at).unwrap();
        }
        if let Some(len) = harm.cut_to {
            file.set_len(len).unwrap();
        }

        let written: Vec<&[u8]> = entries.iter().map(|e| e.payload.as_slice()).collect();
        let lead = entries.iter().take_while(|e| !harm.touches(e)).count();
        let context = format!("case {case} (seed {seed}): {} entries, {harm:?}, first touched {lead}", entries.len());
        let wal = Wal::open(path.clone(), size, salt, epoch, Some(size)).unwrap();
        match replayed(&wal, epoch) {
            Ok(got) => {
                assert!(got.len() >= lead, "{context}: an entry before the damage dropped: {} returned", got.len());
                assert!(got.iter().zip(&written).all(|(a, b)| a == b), "{context}: not what was written");
                assert!(got.len() <= written.len(), "{context}: more than was written");
                assert!(
                    entries[got.len()..].iter().all(|e| harm.touches(e)),
                    "{context}: an intact entry after the damage dropped without a word"
                );
                if got.len() < written.len() {
                    cut += 1;
                } else {
                    whole += 1;
                }
            }
            Err(damage) => {
                refused += 1;
                assert!(
                    harm.cut_to.is_some() || entries.iter().any(|e| harm.touches(e)),
                    "{context}: refused ({damage}) though no entry was touched"
                );
                let got = salvaged(&wal, epoch);
                assert!(got.len() >= lead && got[..lead] == written[..lead], "{context}: salvage dropped an entry");
                let mut rest = written.iter();
                assert!(got.iter().all(|g| rest.any(|w| w == g)), "{context}: salvage returned what was not written");
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
    // The cases reach every outcome.
    assert!(refused > 0 && cut > 0 && whole > 0, "refused {refused}, cut short {cut}, read whole {whole}");
}
