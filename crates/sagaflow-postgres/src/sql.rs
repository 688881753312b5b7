//! The statements of the group-commit writer: each batch is at most one read and one write.
//!
//! A row's version is its `xmin` (the transaction that wrote it last), so a write made against
//! a record read or cached earlier applies only if nobody changed the row since: versions need no
//! column of their own, and a change made by any other process, an operator or a takeover, moves
//! it.

/// The rows of the sagas `$1` (ids), with their versions.
pub(crate) const READ: &str = "SELECT request_id, xmin::text, record::text FROM sagaflow_sagas \
     WHERE request_id = ANY($1::text[])";

/// [`READ`] locking the rows, in one order for every process (so that two writers never wait on
/// each other in a cycle), for a transaction that writes them next.
pub(crate) const READ_FOR_UPDATE: &str = "SELECT request_id, xmin::text, record::text FROM sagaflow_sagas \
     WHERE request_id = ANY($1::text[]) ORDER BY request_id COLLATE \"C\" FOR UPDATE";

/// Begin: the insert of new sagas, `$1`..`$7` (ids, facades, modes, statuses, records, Unix
/// ms of creation, owners), one row each. A saga whose id exists already is skipped (`ON
/// CONFLICT`: the first of two processes beginning one id at once inserts it, the other waits
/// for it and skips), and so is one over a tombstone (the trigger of the tombstone migration).
/// Written as a fragment of [`WRITE`] so that a batch's begins and appends commit together.
macro_rules! insert_begun {
    () => {
        "INSERT INTO sagaflow_sagas (request_id, facade, mode, status, record, created_at, updated_at, owner) \
         SELECT n.request_id, n.facade, n.mode, n.status, n.record::jsonb, \
                to_timestamp(n.created_ms / 1000), to_timestamp(n.created_ms / 1000), n.owner \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[], $7::text[]) \
              AS n(request_id, facade, mode, status, record, created_ms, owner) \
         ON CONFLICT (request_id) DO NOTHING \
         RETURNING request_id, xmin::text AS version"
    };
}

/// Append: the new records of existing sagas, `$8`..`$13` (ids, versions the records were made
/// from, records, statuses, Unix ms of the change, whether ended); a row whose version moved
/// is left alone.
macro_rules! update_changed {
    () => {
        "UPDATE sagaflow_sagas s SET record = u.record::jsonb, status = u.status, \
                updated_at = to_timestamp(u.updated_ms / 1000), \
                ended_at = CASE WHEN u.ended THEN coalesce(s.ended_at, to_timestamp(u.updated_ms / 1000)) END \
         FROM unnest($8::text[], $9::text[], $10::text[], $11::text[], $12::float8[], $13::bool[]) \
              AS u(request_id, version, record, status, updated_ms, ended) \
         WHERE s.request_id = u.request_id AND s.xmin = u.version::xid \
         RETURNING s.request_id, s.xmin::text AS version"
    };
}

/// One batch's writes in one statement, so one commit: [`insert_begun`], [`update_changed`],
/// and the current versions of the sagas `$14` whose answers came from cached records without a
/// write (a duplicate begin, a refused event), to confirm them. Returns (id, version) for every
/// row inserted, updated or confirmed; a saga missing from it was not written.
pub(crate) const WRITE: &str = concat!(
    "WITH begun AS (",
    insert_begun!(),
    "), changed AS (",
    update_changed!(),
    ") SELECT request_id, version FROM begun \
     UNION ALL SELECT request_id, version FROM changed \
     UNION ALL SELECT request_id, xmin::text FROM sagaflow_sagas WHERE request_id = ANY($14::text[])"
);

/// Whether the database refused a statement only because of what ran beside it (a deadlock,
/// a serialization failure): nothing was written and the same writes can be tried again.
pub(crate) fn is_conflict(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if matches!(e.code().as_deref(), Some("40P01" | "40001")))
}
