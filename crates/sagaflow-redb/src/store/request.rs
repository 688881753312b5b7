//! What callers send the writer thread, and how their answers get back to them.

use sagaflow::SagaRecord;
use sagaflow::log::{Begin, LogError, NewSaga, SagaEvent};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::prune::Pruned;

/// Where the writer sends a request's answer.
pub(crate) type Reply<T> = oneshot::Sender<Verdict<T>>;

/// A request's own answer.
pub(crate) type Verdict<T> = std::result::Result<T, LogError>;

/// What the writer made of one request: the outer error is the store's and aborts the whole
/// batch; the inner one is the request's own answer.
pub(crate) type Outcome<T> = Result<Verdict<T>>;

/// One write for the writer thread, with where to send its result.
pub(crate) enum Request {
    Begin(NewSaga, Reply<Begin>),
    Append(String, SagaEvent, Reply<SagaRecord>),
    /// Delete one chunk of ended sagas past the retention, as of this Unix ms.
    Prune(u64, Reply<Pruned>),
    /// Make the database file hold every write answered so far, for a reader that reads the
    /// file alone.
    Sync(Reply<()>),
}

/// A request's result, held until its batch commits.
pub(super) enum Answer {
    Begin(Reply<Begin>, Verdict<Begin>),
    /// The record after the append, `None` for a queued append.
    Append(Reply<SagaRecord>, Verdict<Option<SagaRecord>>),
}

/// Sends `result`, or `failed` if the batch did not commit.
pub(super) fn answer<T>(reply: Reply<T>, result: Verdict<T>, failed: Option<&LogError>) {
    let result = match failed {
        Some(why) => Err(why.clone()),
        None => result,
    };
    // The caller may have given up waiting; its write stands regardless.
    let _ = reply.send(result);
}

impl Answer {
    /// Sends the result, or `failed` if the batch did not commit.
    pub(super) fn send(self, failed: Option<&LogError>) {
        match self {
            Answer::Begin(reply, result) => answer(reply, result, failed),
            // No record: a queued append, whose caller does not wait for an answer.
            Answer::Append(reply, result) => match result.transpose() {
                Some(result) => answer(reply, result, failed),
                None => drop(reply),
            },
        }
    }
}

impl Request {
    /// Whether a caller waits for this request's commit (a queued append's caller does not).
    pub(super) fn is_awaited(&self) -> bool {
        match self {
            Request::Begin(_, reply) => !reply.is_closed(),
            Request::Append(_, _, reply) => !reply.is_closed(),
            Request::Prune(..) | Request::Sync(_) => false,
        }
    }

    /// Answers the request with `why` it could not be taken.
    pub(super) fn fail(self, why: &LogError) {
        match self {
            Request::Begin(_, reply) => answer(reply, Err(Error::Closed.into()), Some(why)),
            Request::Append(_, _, reply) => answer(reply, Err(Error::Closed.into()), Some(why)),
            Request::Prune(_, reply) => answer(reply, Err(Error::Closed.into()), Some(why)),
            Request::Sync(reply) => answer(reply, Err(Error::Closed.into()), Some(why)),
        }
    }
}

/// Turns one request's outcome into its answer; a store failure is recorded in `fatal`.
pub(super) fn settle<R, T>(
    reply: R,
    outcome: Outcome<T>,
    fatal: &mut Option<Error>,
    wrap: fn(R, Verdict<T>) -> Answer,
) -> Answer {
    match outcome {
        Ok(result) => wrap(reply, result),
        Err(e) => {
            // Sent as the batch's failure, cause and all, which replaces every answer of it.
            let result = Err(LogError::unavailable_msg(e.to_string()));
            *fatal = Some(e);
            wrap(reply, result)
        }
    }
}
