//! One batch: planned on the cached records (reading only the sagas it has none of), written in
//! one statement; the sagas whose rows another process moved meanwhile are then read again under
//! lock and written in one transaction.

use std::collections::HashMap;

use sagaflow::log::LogError;
use sqlx::{Connection, PgConnection};

use super::Writer;
use super::cache::Entry;
use super::plan::{Base, Plan, Write, plan};
use super::request::Request;
use crate::store::{decode, ms};
use crate::{sql, tombstones};

/// Times a locked transaction is tried again after a deadlock or serialization failure.
const CONFLICT_RETRIES: usize = 3;
/// Times, within one transaction, a saga whose insert was skipped is read and planned again
/// (a concurrent begin inserted it, or a prune removed it meanwhile).
const INSERT_RETRIES: usize = 3;

/// One saga's requests in a batch, in the order they were made.
pub(super) struct Saga {
    id: String,
    requests: Vec<Request>,
}

/// A row a statement wrote or confirmed: request id to its version now.
type Versions = HashMap<String, u32>;

impl Writer {
    /// Writes the batch and answers its callers; on a failure of the database, fails those not
    /// committed yet and keeps their queued appends for the next batch. A saga with only queued
    /// appends in it waits for its next batch (see [`Deferred`](super::Deferred)), unless they
    /// are due or `all`.
    pub(super) async fn commit(&mut self, batch: Vec<Request>, all: bool) {
        let mut sagas: Vec<Saga> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for request in batch {
            let Some(id) = request.request_id() else {
                request.fail(&LogError::unavailable_msg("closing"));
                continue;
            };
            match index.get(id) {
                Some(&i) => sagas[i].requests.push(request),
                None => {
                    let id = id.to_owned();
                    index.insert(id.clone(), sagas.len());
                    sagas.push(Saga { id, requests: vec![request] });
                }
            }
        }
        let mut kept = Vec::with_capacity(sagas.len());
        for mut saga in sagas {
            let mut since = None;
            if let Some((at, mut earlier)) = self.deferred.take(&saga.id) {
                earlier.append(&mut saga.requests);
                saga.requests = earlier;
                since = Some(at);
            }
            let queued_only = saga.requests.iter().all(|r| !r.is_awaited());
            if !(queued_only && !all && self.deferred.defer(&saga.id, since, &mut saga.requests)) {
                kept.push(saga);
            }
        }
        kept.extend(self.deferred.due(all).into_iter().map(|(id, requests)| Saga { id, requests }));
        let sagas = kept;
        if sagas.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let count = sagas.len();
        let mut conn = match self.connection().await {
            Ok(conn) => conn,
            Err(why) => return self.fail(sagas, &why),
        };
        let missed = match self.optimistic(&mut conn, sagas).await {
            Ok(missed) => missed,
            Err((sagas, e)) => {
                let why = self.why(e);
                self.failed(&why);
                return self.fail(sagas, &why);
            }
        };
        if !missed.is_empty()
            && let Err((sagas, e)) = self.locked(&mut conn, missed).await
        {
            let why = self.why(e);
            self.failed(&why);
            return self.fail(sagas, &why);
        }
        self.last_used = std::time::Instant::now();
        self.conn = Some(conn);
        tracing::trace!(sagas = count, micros = started.elapsed().as_micros() as u64, "batch written");
    }

    fn why(&self, error: sqlx::Error) -> LogError {
        LogError::unavailable(format!("PostgreSQL at {}: writing a batch failed", self.connect.target), error)
    }

    /// Fails the sagas' awaited requests with `why`; their queued appends wait for the next batch.
    fn fail(&mut self, sagas: Vec<Saga>, why: &LogError) {
        let mut queued = Vec::new();
        for request in sagas.into_iter().flat_map(|s| s.requests) {
            if request.is_awaited() {
                request.fail(why);
            } else {
                queued.push(request);
            }
        }
        self.hold_queued(queued);
    }

    /// Plans every saga on its cached record (or, for a saga that is not cached, on the row read
    /// now; for one whose first request begins it, on no row) and writes them in one statement,
    /// committed on its own. Returns the sagas it could not settle: their rows moved since cached
    /// or read, or the statement met a deadlock.
    async fn optimistic(
        &mut self,
        conn: &mut PgConnection,
        mut sagas: Vec<Saga>,
    ) -> Result<Vec<Saga>, (Vec<Saga>, sqlx::Error)> {
        let mut bases: Vec<Option<Base>> = Vec::with_capacity(sagas.len());
        let mut unread = Vec::new();
        for saga in &sagas {
            let base = match self.cache.take(&saga.id) {
                Some(entry) => Some(Base::Cached(entry)),
                None if matches!(saga.requests.first(), Some(Request::Begin { .. })) => Some(Base::New),
                None => {
                    unread.push(saga.id.clone());
                    None
                }
            };
            bases.push(base);
        }
        let mut read = if unread.is_empty() {
            HashMap::new()
        } else {
            match read_rows(conn, sql::READ, &unread).await {
                Ok(rows) => rows,
                Err(e) => return Err((sagas, e)),
            }
        };
        let mut plans = Vec::with_capacity(sagas.len());
        for (saga, base) in sagas.iter_mut().zip(bases) {
            let base = base.unwrap_or_else(|| read.remove(&saga.id).unwrap_or(Base::Absent));
            plans.push(self.plan(saga, base));
        }
        let written = match write(conn, &plans).await {
            Ok(written) => written,
            Err(e) if sql::is_conflict(&e) => {
                tracing::debug!(error = %e, "group commit met a concurrent writer; writing under lock");
                return Ok(sagas);
            }
            Err(e) => return Err((sagas, e)),
        };
        let mut missed = Vec::new();
        for (saga, plan) in sagas.into_iter().zip(plans) {
            match holds(&saga.id, &plan, &written) {
                Some(version) => self.settle(saga, plan, version),
                None => missed.push(saga),
            }
        }
        Ok(missed)
    }

    /// Reads the sagas' rows locked, plans them on those and writes them, in one transaction
    /// (tried again after a deadlock).
    async fn locked(&mut self, conn: &mut PgConnection, sagas: Vec<Saga>) -> Result<(), (Vec<Saga>, sqlx::Error)> {
        let mut sagas = sagas;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut settled = Vec::new();
            match self.locked_once(conn, &mut sagas, &mut settled).await {
                Ok(()) => {
                    for (i, plan, version) in settled {
                        // Each index once: `sagas` is taken apart from the back.
                        let saga = std::mem::replace(&mut sagas[i], Saga { id: String::new(), requests: Vec::new() });
                        self.settle(saga, plan, version);
                    }
                    let vanishing: Vec<Saga> = sagas.into_iter().filter(|s| !s.requests.is_empty()).collect();
                    for saga in vanishing {
                        let why = LogError::unavailable_msg(format!(
                            "PostgreSQL at {}: saga `{}` kept appearing and vanishing during begin",
                            self.connect.target, saga.id
                        ));
                        saga.requests.into_iter().for_each(|r| r.fail(&why));
                    }
                    return Ok(());
                }
                Err(e) if sql::is_conflict(&e) && attempt < CONFLICT_RETRIES => {
                    // The transaction rolled back: nothing of it holds; plan everything again.
                    tracing::debug!(error = %e, attempt, "group commit under lock met a deadlock; trying again");
                }
                Err(e) => return Err((sagas, e)),
            }
        }
    }

    /// One try of [`locked`](Self::locked): `settled` gets the sagas written (by index), with
    /// their plans and versions, answered once the transaction commits; those still pending
    /// after [`INSERT_RETRIES`] are left out.
    async fn locked_once(
        &mut self,
        conn: &mut PgConnection,
        sagas: &mut [Saga],
        settled: &mut Vec<(usize, Plan, Option<u32>)>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = conn.begin().await?;
        let mut pending: Vec<usize> = (0..sagas.len()).collect();
        for _ in 0..INSERT_RETRIES {
            let ids: Vec<String> = pending.iter().map(|&i| sagas[i].id.clone()).collect();
            let mut read = read_rows(&mut tx, sql::READ_FOR_UPDATE, &ids).await?;
            let begun: Vec<String> = pending
                .iter()
                .map(|&i| &sagas[i])
                .filter(|saga| !read.contains_key(&saga.id))
                .filter(|saga| saga.requests.iter().any(|r| matches!(r, Request::Begin { .. })))
                .map(|saga| saga.id.clone())
                .collect();
            if !begun.is_empty() {
                for tombstone in tombstones::find_all(&mut tx, &begun).await? {
                    read.insert(tombstone.request_id.clone(), Base::Pruned(tombstone));
                }
            }
            let mut plans = Vec::with_capacity(pending.len());
            for &i in &pending {
                let base = read.remove(&sagas[i].id).unwrap_or(Base::Absent);
                plans.push(self.plan(&mut sagas[i], base));
            }
            let written = write(&mut tx, &plans).await?;
            let mut missed = Vec::new();
            for (i, plan) in pending.into_iter().zip(plans) {
                // Rows read under lock: only an insert can miss (a row that appeared meanwhile,
                // or a tombstone).
                match holds(&sagas[i].id, &plan, &written) {
                    Some(version) => settled.push((i, plan, version)),
                    None => missed.push(i),
                }
            }
            pending = missed;
            if pending.is_empty() {
                break;
            }
        }
        tx.commit().await
    }

    /// Plans a saga's requests on `base`; the requests after its begin go to the next batch.
    fn plan(&mut self, saga: &mut Saga, base: Base) -> Plan {
        let planned = plan(&saga.requests, base);
        if planned.carried > 0 {
            let carried = saga.requests.split_off(planned.answers.len());
            self.held.extend(carried);
        }
        planned
    }

    /// Answers a saga's requests once its write (or its cached record) holds, and caches its record.
    fn settle(&mut self, saga: Saga, plan: Plan, version: Option<u32>) {
        let Plan { answers, write, unchanged, .. } = plan;
        for (request, answer) in saga.requests.into_iter().zip(answers) {
            request.answer(answer);
        }
        match (write, version) {
            (Write::Insert { record, .. } | Write::Update { record, .. }, Some(version)) => {
                self.cache.put(Entry::new(record, version));
            }
            (Write::None, _) => {
                if let Some(entry) = unchanged {
                    self.cache.put(entry);
                }
            }
            _ => {}
        }
    }
}

/// Whether a saga's plan holds after the statement, and its row's version then: its write
/// applied, or it had none and needed none confirmed, or its cached row is still at the version
/// it was planned on. `None`: it must be planned again on the row as it is.
fn holds(id: &str, plan: &Plan, written: &Versions) -> Option<Option<u32>> {
    match &plan.write {
        Write::Insert { .. } | Write::Update { .. } => written.get(id).map(|&v| Some(v)),
        Write::None if plan.confirm => {
            let version = plan.unchanged.as_ref()?.version;
            (written.get(id) == Some(&version)).then_some(Some(version))
        }
        Write::None => Some(None),
    }
}

/// The rows of `ids`, by request id, as the bases to plan on.
async fn read_rows(
    conn: &mut PgConnection,
    statement: &'static str,
    ids: &[String],
) -> Result<HashMap<String, Base>, sqlx::Error> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(statement).bind(ids).fetch_all(conn).await?;
    Ok(rows
        .into_iter()
        .map(|(id, version, text)| {
            let base = match (decode(&id, &text), version.parse::<u32>()) {
                (Ok(record), Ok(version)) => Base::Stored(Entry::new(record, version)),
                (Err(e), _) => Base::Corrupt(e),
                (_, Err(e)) => Base::Corrupt(LogError::corrupt(format!("saga `{id}`: row version `{version}`"), e)),
            };
            (id, base)
        })
        .collect())
}

/// The batch's rows, as [`sql::WRITE`] takes them.
#[derive(Default)]
struct Rows {
    new_ids: Vec<String>,
    facades: Vec<String>,
    modes: Vec<String>,
    new_statuses: Vec<String>,
    new_records: Vec<String>,
    created_ms: Vec<f64>,
    owners: Vec<Option<String>>,
    ids: Vec<String>,
    versions: Vec<String>,
    records: Vec<String>,
    statuses: Vec<String>,
    updated_ms: Vec<f64>,
    ended: Vec<bool>,
    confirm: Vec<String>,
}

/// Writes what the plans changed, in one statement; returns the versions of the rows written
/// and confirmed.
async fn write(conn: &mut PgConnection, plans: &[Plan]) -> Result<Versions, sqlx::Error> {
    let mut rows = Rows::default();
    for plan in plans {
        match &plan.write {
            Write::Insert { record, json } => {
                rows.new_ids.push(record.request_id.clone());
                rows.facades.push(record.facade.clone());
                rows.modes.push(record.mode.to_string());
                rows.new_statuses.push(record.status().to_string());
                rows.new_records.push(json.clone());
                rows.created_ms.push(ms(record.created_ms));
                rows.owners.push(record.owner.clone());
            }
            Write::Update { record, json, version } => {
                rows.ids.push(record.request_id.clone());
                rows.versions.push(version.to_string());
                rows.records.push(json.clone());
                rows.statuses.push(record.status().to_string());
                rows.updated_ms.push(ms(record.updated_ms));
                rows.ended.push(record.state.is_ended());
            }
            Write::None if plan.confirm => {
                if let Some(entry) = &plan.unchanged {
                    rows.confirm.push(entry.record.request_id.clone());
                }
            }
            Write::None => {}
        }
    }
    if rows.new_ids.is_empty() && rows.ids.is_empty() && rows.confirm.is_empty() {
        return Ok(Versions::new());
    }
    let returned: Vec<(String, String)> = sqlx::query_as(sql::WRITE)
        .bind(rows.new_ids)
        .bind(rows.facades)
        .bind(rows.modes)
        .bind(rows.new_statuses)
        .bind(rows.new_records)
        .bind(rows.created_ms)
        .bind(rows.owners)
        .bind(rows.ids)
        .bind(rows.versions)
        .bind(rows.records)
        .bind(rows.statuses)
        .bind(rows.updated_ms)
        .bind(rows.ended)
        .bind(rows.confirm)
        .fetch_all(conn)
        .await?;
    Ok(returned.into_iter().filter_map(|(id, version)| Some((id, version.parse().ok()?))).collect())
}
