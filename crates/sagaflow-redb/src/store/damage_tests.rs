//! Opening a log whose write-ahead file was damaged after a crash: refused with the file and
//! the offset named, or replayed up to a write cut short; salvaged on request.

use std::collections::{BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redb::{Database, ReadableDatabase};
use sagaflow::SagaRecord;
use sagaflow::log::{SagaEvent, SagaLog};
use serde_json::json;

use super::tables::{META, WAL_EPOCH, WAL_SALT};
use super::tests::{crash_image, new_saga, run_to_end};
use crate::wal::{HEADER, Wal};
use crate::{Error, RedbOptions, RedbSagaLog, WAL_FILE_NAME};

const WAL_SIZE: u64 = 256 << 10;

/// A log that writes everything to its write-ahead file and makes no checkpoint.
fn options(dir: &Path) -> RedbOptions {
    RedbOptions::new(dir)
        .prune_interval(Duration::MAX)
        .checkpoint_interval(Duration::from_secs(3600))
        .wal_size(WAL_SIZE)
}

/// Where each entry the log wrote since its last checkpoint lies in its write-ahead file, in
/// the order written, read from an undamaged crash image.
fn entries(image: &Path) -> Vec<Range<u64>> {
    let (epoch, salt) = {
        let db = Database::open(image.join(crate::FILE_NAME)).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        let get = |key| meta.get(key).unwrap().unwrap().value();
        (get(WAL_EPOCH), get(WAL_SALT))
    };
    let wal = Wal::open(image.join(WAL_FILE_NAME), WAL_SIZE, salt, epoch, Some(WAL_SIZE)).unwrap();
    let [stored, next] = wal.replay(epoch).unwrap();
    assert!(next.entries.is_empty() && stored.damage.is_empty() && stored.torn.is_none());
    let mut at = (epoch % 2) * (WAL_SIZE / 2);
    stored
        .entries
        .iter()
        .map(|payload| {
            let entry = at..at + (HEADER + payload.len()) as u64;
            at = entry.end;
            entry
        })
        .collect()
}

fn flip(path: &Path, at: u64, mask: u8) {
    let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ mask], at).unwrap();
}

#[tokio::test]
async fn a_damaged_write_ahead_file_refuses_the_open_and_salvage_replays_what_is_intact() {
    let dir = tempfile::tempdir().unwrap();
    let log = RedbSagaLog::open(options(dir.path())).unwrap();
    let mut answered = Vec::new();
    for i in 0..6 {
        answered.push(run_to_end(&log, &format!("s{i}")).await);
    }
    assert_eq!(log.stats().checkpoints, 0);
    let image = crash_image(dir.path(), true);
    let wal = image.path().join(WAL_FILE_NAME);
    let entries = entries(image.path());
    assert_eq!(entries.len(), 18, "one entry per awaited write");

    // A torn last entry (the crash hit its write): cut, and every saga before it is there.
    let torn = crash_image(image.path(), true);
    flip(&torn.path().join(WAL_FILE_NAME), entries[17].end - 1, 0x01);
    let reopened = RedbSagaLog::open(options(torn.path())).unwrap();
    for record in &answered[..5] {
        assert_eq!(reopened.get(&record.request_id).await.unwrap().as_ref(), Some(record));
    }
    assert_eq!(reopened.get("s5").await.unwrap().unwrap().history.len(), 2, "its last write is cut");
    drop(reopened);

    // s2's start damaged, s2's end and three sagas after it intact: the open is refused.
    flip(&wal, entries[6].start + HEADER as u64 + 2, 0x40);
    match RedbSagaLog::open(options(image.path())) {
        Err(e @ Error::WalDamaged { .. }) => {
            let Error::WalDamaged { path, offset, .. } = &e else { unreachable!() };
            assert_eq!((path, *offset), (&wal, entries[6].start));
            let message = e.to_string();
            assert!(message.contains("sagas.wal") && message.contains(&entries[6].start.to_string()), "{message}");
            assert!(message.contains("salvage"), "{message}");
        }
        other => panic!("open: {other:?}"),
    }
    // Nothing was changed: refused again.
    assert!(matches!(RedbSagaLog::open(options(image.path())), Err(Error::WalDamaged { .. })));

    // Salvaged: every saga is back, s2 too (its index rebuilt from its last record), and the
    // indexes agree with the records.
    let salvaged = RedbSagaLog::open(options(image.path()).salvage_wal(true)).unwrap();
    for record in &answered {
        assert_eq!(salvaged.get(&record.request_id).await.unwrap().as_ref(), Some(record));
    }
    assert!(salvaged.unfinished().await.unwrap().is_empty());
    assert_eq!(salvaged.list(sagaflow::log::ListFilter::default()).await.unwrap().len(), 6);
    drop(salvaged);
    // The replayed entries are in the database file now: opening needs no salvage any more.
    let log = RedbSagaLog::open(options(image.path())).unwrap();
    assert_eq!(log.get("s2").await.unwrap().as_ref(), Some(&answered[2]));
}

#[tokio::test]
async fn a_salvaged_saga_whose_start_was_lost_is_found_by_its_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let log = RedbSagaLog::open(options(dir.path())).unwrap();
    let first = run_to_end(&log, "first").await;
    log.begin(new_saga("lost")).await.unwrap();
    let lost = log.append("lost", SagaEvent::StepStarted { index: 0 }).await.unwrap();
    let image = crash_image(dir.path(), true);
    let entries = entries(image.path());
    // The entry of `lost`'s start: its request id, number and creation time are gone with it.
    flip(&image.path().join(WAL_FILE_NAME), entries[3].start + HEADER as u64 + 5, 0x08);
    assert!(matches!(RedbSagaLog::open(options(image.path())), Err(Error::WalDamaged { .. })));
    let log = RedbSagaLog::open(options(image.path()).salvage_wal(true)).unwrap();
    assert_eq!(log.get("first").await.unwrap(), Some(first));
    assert_eq!(log.get("lost").await.unwrap().as_ref(), Some(&lost));
    let running: Vec<String> = log.unfinished().await.unwrap().into_iter().map(|r| r.request_id).collect();
    assert_eq!(running, ["lost"]);
    // It goes on as any saga.
    let done = log.append("lost", SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap();
    assert!(done.state.is_ended());
}

/// Random sagas written one awaited write at a time, the write-ahead file of the crash image
/// then cut or flipped at random: the open never panics and either refuses, naming where the
/// damage starts, or replays a prefix of the writes that holds every write before the damage,
/// with indexes that agree; salvage never loses a write before the damage nor invents a state.
/// `SAGAFLOW_WAL_CASES` (default 400) / 16 cases.
#[tokio::test]
async fn damage_never_loses_an_answered_write_before_it() {
    let cases: u64 = std::env::var("SAGAFLOW_WAL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400) / 16;
    let seed: u64 = std::env::var("SAGAFLOW_WAL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0xDA4A6E);
    let root = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let (mut refused, mut replayed) = (0, 0);
    for case in 0..cases.max(1) {
        let mut rng = StdRng::seed_from_u64(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let dir = root.path().join(format!("log-{case}"));
        let log = RedbSagaLog::open(options(&dir)).unwrap();
        // (request id, record answered) per write, in order; interleaved across sagas.
        let mut writes: Vec<(String, SagaRecord)> = Vec::new();
        let mut progress: Vec<u8> = vec![0; rng.random_range(1..6)];
        while let Some(saga) = {
            let open: Vec<usize> = (0..progress.len()).filter(|&s| progress[s] < 3).collect();
            (!open.is_empty() && rng.random_bool(0.9)).then(|| open[rng.random_range(0..open.len())])
        } {
            let id = format!("s{saga}");
            let record = match progress[saga] {
                0 => match log.begin(new_saga(&id)).await.unwrap() {
                    sagaflow::log::Begin::Started(record) => record,
                    other => panic!("begin: {other:?}"),
                },
                1 => log.append(&id, SagaEvent::StepStarted { index: 0 }).await.unwrap(),
                _ => log.append(&id, SagaEvent::StepCompleted { index: 0, attempts: 1, data: json!(1) }).await.unwrap(),
            };
            progress[saga] += 1;
            writes.push((id, record));
        }
        let image = crash_image(&dir, true);
        drop(log);
        let entries = entries(image.path());
        assert_eq!(entries.len(), writes.len(), "case {case}: one entry per write");
        let end = entries.last().map_or(WAL_SIZE / 2, |e| e.end);

        let wal = image.path().join(WAL_FILE_NAME);
        let mut flipped = BTreeSet::new();
        let mut cut = None;
        if rng.random_bool(0.3) {
            cut = Some(rng.random_range(0..end + 64));
        } else {
            for _ in 0..rng.random_range(1..=2) {
                flipped.insert(rng.random_range(0..end + 64));
            }
        }
        for &at in &flipped {
            flip(&wal, at, rng.random_range(1..=255));
        }
        if let Some(len) = cut {
            OpenOptions::new().write(true).open(&wal).unwrap().set_len(len).unwrap();
        }
        let damage = flipped.first().copied().into_iter().chain(cut).min().unwrap();
        let touched = |e: &Range<u64>| flipped.range(e.clone()).next().is_some() || cut.is_some_and(|len| e.end > len);
        let lead = entries.iter().take_while(|e| !touched(e)).count();
        let context = format!(
            "case {case} (seed {seed}): {} writes, flipped {flipped:?}, cut {cut:?}, first touched {lead}",
            writes.len()
        );

        // The record of each saga after the first `k` writes.
        let after = |k: usize| {
            let mut state: HashMap<&str, &SagaRecord> = HashMap::new();
            for (id, record) in &writes[..k] {
                state.insert(id, record);
            }
            state
        };
        let ids: Vec<String> = (0..progress.len()).map(|s| format!("s{s}")).collect();
        let read_all = |log: RedbSagaLog| async move {
            let mut found = HashMap::new();
            for id in &ids {
                found.insert(id.clone(), log.get(id).await.unwrap());
            }
            let mut running: Vec<String> = log.unfinished().await.unwrap().into_iter().map(|r| r.request_id).collect();
            running.sort();
            (found, running)
        };
        let running_of = |found: &HashMap<String, Option<SagaRecord>>| {
            let mut running: Vec<String> = found
                .iter()
                .filter(|(_, r)| r.as_ref().is_some_and(|r| !r.state.is_ended()))
                .map(|(id, _)| id.clone())
                .collect();
            running.sort();
            running
        };
        match RedbSagaLog::open(options(image.path())) {
            Ok(log) => {
                replayed += 1;
                let (found, running) = read_all(log).await;
                let k = (lead..=writes.len()).find(|&k| {
                    let state = after(k);
                    found.iter().all(|(id, record)| record.as_ref() == state.get(id.as_str()).copied())
                });
                assert!(
                    k.is_some(),
                    "{context}: what was replayed is no prefix of the writes holding the first {lead}"
                );
                assert_eq!(running, running_of(&found), "{context}: indexes disagree with the records");
            }
            Err(Error::WalDamaged { offset, .. }) => {
                refused += 1;
                assert!(offset <= damage, "{context}: damage reported at {offset}");
                let log = RedbSagaLog::open(options(image.path()).salvage_wal(true)).unwrap();
                let (found, running) = read_all(log).await;
                for (id, record) in after(lead) {
                    let got = found[id].as_ref().unwrap_or_else(|| panic!("{context}: salvage lost {id}"));
                    assert!(got.history.len() >= record.history.len(), "{context}: salvage lost a write of {id}");
                }
                for (id, record) in &found {
                    if let Some(record) = record {
                        assert!(
                            writes.iter().any(|(w, r)| w == id && r == record),
                            "{context}: {id} salvaged as never written"
                        );
                    }
                }
                assert_eq!(running, running_of(&found), "{context}: salvaged indexes disagree with the records");
            }
            Err(other) => panic!("{context}: open failed otherwise: {other}"),
        }
    }
    assert!(refused > 0 && replayed > 0, "refused {refused}, replayed {replayed}");
}
