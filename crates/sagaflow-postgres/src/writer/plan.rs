//! One saga's share of a batch: its requests applied in order to its current record, giving
//! each request its answer and the saga at most one row to write.

use sagaflow::SagaRecord;
use sagaflow::log::{Begin, LogError, Tombstone, check_owner};

use super::cache::Entry;
use super::request::{Answer, Request};
use crate::store::encode;

/// What a saga's requests are applied to.
#[derive(Debug)]
pub(crate) enum Base {
    /// The record as this writer last wrote it: current unless another process wrote since,
    /// which the write (or a check of the row's version) finds out.
    Cached(Entry),
    /// Not cached, and its first request begins it: taken to be new, which the insert checks.
    New,
    /// As read from the database in this batch.
    Stored(Entry),
    /// Read from the database in this batch: no row.
    Absent,
    /// No row, and a tombstone: pruned.
    Pruned(Tombstone),
    /// A row whose record cannot be read.
    Corrupt(LogError),
}

impl Base {
    /// Whether answers made from it hold without a write (it was read in this batch).
    fn is_read(&self) -> bool {
        matches!(self, Base::Stored(_) | Base::Absent | Base::Pruned(_) | Base::Corrupt(_))
    }
}

/// The row a saga's requests leave to write.
#[derive(Debug)]
pub(crate) enum Write {
    /// Nothing changed.
    None,
    /// A new saga, and its record serialized.
    Insert { record: SagaRecord, json: String },
    /// A changed record, made from the row at `version`, and serialized.
    Update { record: SagaRecord, json: String, version: u32 },
}

/// A saga's requests, planned.
#[derive(Debug)]
pub(crate) struct Plan {
    /// One per request taken, in order.
    pub(crate) answers: Vec<Result<Answer, LogError>>,
    pub(crate) write: Write,
    /// With [`Write::None`]: the saga's record, unchanged, to cache again.
    pub(crate) unchanged: Option<Entry>,
    /// Whether the answers were made from a cached record and hold only if the row is still at
    /// its version (checked by the batch's statement), as they do when they made a write.
    pub(crate) confirm: bool,
    /// Requests after the one that began the saga: for the next batch, once its row exists
    /// (a row is inserted or updated, not both, in one statement).
    pub(crate) carried: usize,
}

/// Applies `requests` (all of one saga, in order) to `base`.
pub(crate) fn plan(requests: &[Request], base: Base) -> Plan {
    let read = base.is_read();
    let (mut current, version) = match base {
        Base::Cached(entry) | Base::Stored(entry) => (Current::Record(entry.record), Some(entry.version)),
        Base::New | Base::Absent => (Current::Absent, None),
        Base::Pruned(tombstone) => (Current::Pruned(tombstone), None),
        Base::Corrupt(why) => (Current::Corrupt(why), None),
    };
    let mut answers = Vec::with_capacity(requests.len());
    let mut changed = false;
    let mut inserted = false;
    for request in requests {
        let answer = match (request, &mut current) {
            (Request::Begin { .. } | Request::Append { .. }, Current::Corrupt(why)) => Err(why.clone()),
            (Request::Begin { record, .. }, Current::Absent) => {
                current = Current::Record((**record).clone());
                inserted = true;
                answers.push(Ok(Answer::Begin(Begin::Started((**record).clone()))));
                break;
            }
            (Request::Begin { .. }, Current::Record(record)) => Ok(Answer::Begin(Begin::Exists(record.clone()))),
            (Request::Begin { .. }, Current::Pruned(tombstone)) => Ok(Answer::Begin(Begin::Pruned(tombstone.clone()))),
            (Request::Append { request_id, .. }, Current::Absent | Current::Pruned(_)) => {
                Err(LogError::NotFound(request_id.clone()))
            }
            (Request::Append { event, writer, reply, .. }, Current::Record(record)) => {
                match check_owner(record, writer.as_deref(), event).and_then(|()| Ok(record.apply(event)?)) {
                    Ok(()) => {
                        changed = true;
                        Ok(Answer::Append(reply.is_some().then(|| record.clone())))
                    }
                    Err(refused) => Err(refused),
                }
            }
            (Request::Close(_), _) => Err(LogError::unavailable_msg("closing")),
        };
        answers.push(answer);
    }
    let carried = requests.len() - answers.len();
    let version = version.unwrap_or_default();
    let (write, unchanged) = match current {
        Current::Record(record) if inserted || changed => match encode(&record) {
            Ok(json) if inserted => (Write::Insert { record, json }, None),
            Ok(json) => (Write::Update { record, json, version }, None),
            Err(e) => {
                // Nothing is written: every request of the saga says why.
                answers.iter_mut().for_each(|a| *a = Err(e.clone()));
                (Write::None, None)
            }
        },
        Current::Record(record) => (Write::None, Some(Entry::new(record, version))),
        _ => (Write::None, None),
    };
    let confirm = !read && matches!(write, Write::None) && unchanged.is_some();
    Plan { answers, write, unchanged, confirm, carried }
}

/// A saga's record as the requests go.
// Held one at a time, on the stack: boxing the record would cost an allocation per saga.
#[allow(clippy::large_enum_variant)]
enum Current {
    Record(SagaRecord),
    Absent,
    Pruned(Tombstone),
    Corrupt(LogError),
}
