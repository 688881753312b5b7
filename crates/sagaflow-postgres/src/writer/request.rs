//! What callers send the writer, and how their answers get back to them.

use std::sync::Arc;

use sagaflow::SagaRecord;
use sagaflow::log::{Begin, LogError, SagaEvent};
use tokio::sync::oneshot;

/// Where the writer sends a request's answer.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, LogError>>;

/// One write for the writer task, with where to send its result.
pub(crate) enum Request {
    /// Records a new saga; the record is made by the caller, so that the writer's time goes to
    /// the database.
    Begin { record: Box<SagaRecord>, reply: Reply<Begin> },
    /// Applies an event as the replica `writer` (if registered); `reply` is `None` for a queued
    /// append, whose caller does not wait.
    Append { request_id: String, event: SagaEvent, writer: Option<Arc<str>>, reply: Option<Reply<SagaRecord>> },
    /// Stores what was sent before, closes the connection and stops.
    Close(oneshot::Sender<()>),
}

/// A request's answer, held until its saga's write is committed.
#[derive(Debug)]
pub(crate) enum Answer {
    Begin(Begin),
    /// The record after an awaited append; `None` for a queued one.
    Append(Option<SagaRecord>),
}

impl Request {
    /// The saga the request is for (`None` for [`Request::Close`]).
    pub(crate) fn request_id(&self) -> Option<&str> {
        match self {
            Request::Begin { record, .. } => Some(&record.request_id),
            Request::Append { request_id, .. } => Some(request_id),
            Request::Close(_) => None,
        }
    }

    /// Whether a caller waits for this request (a queued append's does not).
    pub(crate) fn is_awaited(&self) -> bool {
        !matches!(self, Request::Append { reply: None, .. })
    }

    /// Sends the answer; a caller that stopped waiting no longer needs it, and its write stands.
    pub(crate) fn answer(self, result: Result<Answer, LogError>) {
        match self {
            Request::Begin { reply, .. } => {
                let _ = reply.send(result.and_then(|answer| match answer {
                    Answer::Begin(begin) => Ok(begin),
                    Answer::Append(_) => Err(LogError::unavailable_msg("a begin was answered as an append")),
                }));
            }
            Request::Append { reply: Some(reply), .. } => {
                let _ = reply.send(result.and_then(|answer| match answer {
                    Answer::Append(Some(record)) => Ok(record),
                    _ => Err(LogError::unavailable_msg("an append was answered without its record")),
                }));
            }
            Request::Append { reply: None, request_id, .. } => {
                if let Err(e) = result {
                    tracing::debug!(%request_id, error = %e, "a queued append was not stored");
                }
            }
            Request::Close(reply) => {
                let _ = reply.send(());
            }
        }
    }

    /// Answers with `why` the request could not be stored.
    pub(crate) fn fail(self, why: &LogError) {
        self.answer(Err(why.clone()));
    }
}
